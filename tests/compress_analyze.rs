//! `analyze_model`: removal scores agree with the engine, the spec is restored, the
//! weight score follows its definition, the report round-trips.

use std::path::Path;

use half::f16;
use hiprune::compress::analyze::energy_score;
use hiprune::compress::{AnalyzeOptions, SensitivityReport, analyze_model, weight_scores};
use hiprune::model::{Mmdit, MmditInputs, PruneSpec, TensorFile};
use hiprune::quant::{DenseData, LinearWeights};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mmdit")
        .join(name)
}

/// The definition, computed naively in f64.
fn energy_naive(w: &[f32]) -> f64 {
    let sq: Vec<f64> = w.iter().map(|&v| (v as f64) * (v as f64)).collect();
    sq.iter()
        .map(|&a| {
            let denom: f64 = sq.iter().filter(|&&b| b <= a).sum();
            if denom > 0.0 { a / denom } else { 0.0 }
        })
        .sum()
}

#[test]
fn energy_score_follows_its_definition() {
    let w = [1.0f32, -1.0, 2.0];
    let (s, n) = energy_score(&LinearWeights::dense(DenseData::F32(&w), 1, 3).unwrap());
    assert_eq!(n, 3);
    assert!((s - (0.5 + 0.5 + 4.0 / 6.0)).abs() < 1e-9, "{s}");
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..5 {
        let (n, k) = (rng.random_range(1..9), rng.random_range(1..37));
        // Few distinct values, so ties are common.
        let w: Vec<f32> = (0..n * k)
            .map(|_| rng.random_range(-4i32..5) as f32 * 0.25)
            .collect();
        let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let (s, c) = energy_score(&LinearWeights::dense(DenseData::F16(&h), n, k).unwrap());
        assert_eq!(c, n * k);
        let want = energy_naive(&w);
        assert!((s - want).abs() < 1e-6 * want.max(1.0), "{s} vs {want}");
    }
}

#[test]
fn removal_scores_match_the_engine_and_the_spec_is_restored() {
    let src = fixture("mmditx");
    let mut model = Mmdit::load(&src).unwrap();
    let file = TensorFile::open(src.join("inputs.safetensors")).unwrap();
    let opts = AnalyzeOptions::default();
    let mut calls = 0;
    let report = analyze_model(&mut model, "mmditx", Some(&file), &opts, &mut |d, t| {
        assert!(d <= t);
        calls += 1;
    })
    .unwrap();
    assert!(calls > 0);
    assert_eq!(model.prune_spec(), &PruneSpec::none());
    assert_eq!(report.blocks.len(), 4);
    assert!(!report.synthetic_inputs);

    // Block 2 removed, recomputed through the engine.
    let inputs = MmditInputs {
        hidden_states: file.get("hidden_states").unwrap(),
        encoder_hidden_states: file.get("encoder_hidden_states").unwrap(),
        pooled_projections: file.get("pooled_projections").unwrap(),
        timestep: file.get("timestep").unwrap(),
    };
    let y0 = model.forward(&inputs).unwrap();
    model.set_prune(PruneSpec::remove_blocks([2])).unwrap();
    let y = model.forward(&inputs).unwrap();
    let items = y0.shape[0];
    let per = y0.data.len() / items;
    let mut want = 0.0f64;
    for b in 0..items {
        let (mut d, mut n) = (0.0f64, 0.0f64);
        for j in b * per..(b + 1) * per {
            d += ((y0.data[j] - y.data[j]) as f64).powi(2);
            n += (y0.data[j] as f64).powi(2);
        }
        want += (d / n).sqrt();
    }
    want /= items as f64;
    let got = report.blocks[2].rel_l2.unwrap() as f64;
    assert!((got - want).abs() < 1e-5 * want.max(1.0), "{got} vs {want}");

    // Sub-components: attn2 only in the dual blocks (0, 1), ff_context not in the last.
    let names = |i: usize| -> Vec<String> {
        report.blocks[i]
            .components
            .iter()
            .map(|c| c.component.clone())
            .collect()
    };
    assert!(names(0).contains(&"attn2".to_string()));
    assert!(!names(2).contains(&"attn2".to_string()));
    assert!(!names(3).contains(&"ff_context".to_string()));
    for b in &report.blocks {
        assert!(b.rel_l2.unwrap() > 0.0);
        assert!(b.influence.unwrap() >= 0.0);
        assert!(b.weight_score > 0.0);
        for c in &b.components {
            assert!(c.rel_l2.is_finite() && c.cos_dist.is_finite());
        }
    }

    // JSON round trip and SVG.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.json");
    report.write(&path).unwrap();
    assert_eq!(SensitivityReport::from_file(&path).unwrap(), report);
    let svg = report.svg();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.matches("<polyline").count() >= 7);
}

#[test]
fn synthetic_inputs_are_seeded_and_reported() {
    let mut model = Mmdit::load(fixture("sd35")).unwrap();
    let opts = AnalyzeOptions {
        synthetic_inputs: 3,
        latent: 6,
        tokens: 5,
        seed: 9,
        components: false,
    };
    let a = analyze_model(&mut model, "sd35", None, &opts, &mut |_, _| {}).unwrap();
    let b = analyze_model(&mut model, "sd35", None, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(a, b);
    assert!(a.synthetic_inputs && a.inputs.contains("synthetic"));
    assert_eq!(a.num_inputs, 3);
    assert!(a.blocks.iter().all(|b| b.components.is_empty()));
    let c = analyze_model(
        &mut model,
        "sd35",
        None,
        &AnalyzeOptions { seed: 10, ..opts },
        &mut |_, _| {},
    )
    .unwrap();
    assert_ne!(a.blocks[0].rel_l2, c.blocks[0].rel_l2);
    // A pruned model analyses only its kept blocks.
    model.set_prune(PruneSpec::remove_blocks([1])).unwrap();
    let w = weight_scores(&model, "sd35").unwrap();
    assert_eq!(
        w.blocks.iter().map(|b| b.block).collect::<Vec<_>>(),
        vec![0, 2, 3]
    );
    assert_eq!(w.sensitivity()[1], 0.0);
}
