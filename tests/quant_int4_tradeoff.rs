//! Accuracy of symmetric (scale only) against asymmetric (scale and offset) INT4 at
//! group 64, with and without the clip search: weight reconstruction error on seeded
//! Gaussian and skewed weights, and the forward error of a quantised fixture model.
//! Run with `--nocapture` to see the table BENCHMARKS.md quotes.

use std::path::Path;

use hiprune::compress::{CompressOptions, WeightFormat, compress_checkpoint};
use hiprune::model::{Mmdit, MmditInputs, TensorFile};
use hiprune::quant::reference::dequantize;
use hiprune::quant::{Int4Options, quantize_int4};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(1e-12f64..1.0);
    let u2: f64 = rng.random_range(0.0f64..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// `||W - deq(Q(W))|| / ||W||`.
fn rel_err(w: &[f32], n: usize, k: usize, symmetric: bool, clip_search: bool) -> f64 {
    let opts = Int4Options {
        group: 64,
        symmetric,
        clip_search,
    };
    let q = quantize_int4(w, n, k, &opts).unwrap();
    let d = dequantize(&q.view().unwrap());
    let num: f64 = w
        .iter()
        .zip(&d)
        .map(|(&a, &b)| (f64::from(a) - b).powi(2))
        .sum();
    let den: f64 = w.iter().map(|&a| f64::from(a).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn weight_reconstruction_error_sym_vs_asym() {
    let (n, k) = (512, 2432);
    let mut rng = StdRng::seed_from_u64(0x5e11);
    let gaussian: Vec<f32> = (0..n * k).map(|_| normal(&mut rng) as f32).collect();
    // Right-skewed, zero-median: exp(0.75 z) - 1.
    let skewed: Vec<f32> = (0..n * k)
        .map(|_| ((0.75 * normal(&mut rng)).exp() - 1.0) as f32)
        .collect();
    println!("| weights | int4 (sym) | int4 (sym) + clip | int4-asym | int4-asym + clip |");
    println!("|---|---|---|---|---|");
    for (name, w) in [
        ("Gaussian N(0, 1)", &gaussian),
        ("skewed exp(0.75 z) - 1", &skewed),
    ] {
        let e: Vec<f64> = [(true, false), (true, true), (false, false), (false, true)]
            .iter()
            .map(|&(s, c)| rel_err(w, n, k, s, c))
            .collect();
        println!(
            "| {name} | {:.4} | {:.4} | {:.4} | {:.4} |",
            e[0], e[1], e[2], e[3]
        );
        // The clip search never makes either kind worse.
        assert!(e[1] <= e[0] && e[3] <= e[2], "{name}: {e:?}");
        // Both are 4-bit codes of sensible accuracy; the asymmetric kind, with its
        // extra offset, is never far ahead on these distributions.
        assert!(e.iter().all(|&x| x > 0.0 && x < 0.2), "{name}: {e:?}");
        assert!(e[0] < 2.0 * e[2], "{name}: {e:?}");
    }
}

#[test]
fn fixture_forward_error_sym_vs_asym() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mmdit/sd35");
    let file = TensorFile::open(src.join("inputs.safetensors")).unwrap();
    let inputs = MmditInputs {
        hidden_states: file.get("hidden_states").unwrap(),
        encoder_hidden_states: file.get("encoder_hidden_states").unwrap(),
        pooled_projections: file.get("pooled_projections").unwrap(),
        timestep: file.get("timestep").unwrap(),
    };
    let dense = Mmdit::load(&src).unwrap().forward(&inputs).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut errs = Vec::new();
    for (weights, clip_search) in [
        (WeightFormat::Int4, false),
        (WeightFormat::Int4, true),
        (WeightFormat::Int4Asym, false),
        (WeightFormat::Int4Asym, true),
    ] {
        let dst = dir.path().join(format!("{weights}-{clip_search}.hpk"));
        let opts = CompressOptions {
            weights,
            // Most of the fixture's layers have K = 16 and stay f16; those with K = 64 are
            // quantised.
            group: 32,
            clip_search,
            ..CompressOptions::default()
        };
        let s = compress_checkpoint(&src, &dst, &opts, &mut |_| {}).unwrap();
        let y = Mmdit::load(&dst).unwrap().forward(&inputs).unwrap();
        let num: f64 = y
            .data
            .iter()
            .zip(&dense.data)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let den: f64 = dense.data.iter().map(|a| f64::from(*a).powi(2)).sum();
        let e = (num / den).sqrt();
        println!(
            "sd35 fixture, {weights} clip={clip_search}: {} layers quantised, forward rel. error {e:.4}",
            s.quantized_layers
        );
        errs.push((s.quantized_layers, e));
    }
    for &(_, e) in &errs {
        assert!(e.is_finite() && e < 0.5, "{errs:?}");
    }
}
