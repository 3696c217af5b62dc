//! `hiprune demo`: the end-to-end path of one layer. Generates a seeded SD3.5-shaped
//! linear layer, quantises it to INT4 and NF4, writes a package, maps it back and runs
//! the 4-bit kernels against the dense original, then reports size, speed and error.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use half::f16;
use hiprune::backend::cpu::{DenseData, LinearWeights, linear};
use hiprune::format::{PackageInfo, Precision, Provenance};
use hiprune::quant::{Int4Options, quantize_int4, quantize_nf4};
use hiprune::{Error, Package, PackageWriter, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::report::{Table, cpu_model, human_bytes};

/// Options of `hiprune demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Input features K (default: SD3.5 Large hidden size).
    #[arg(long, default_value_t = 2432)]
    k: usize,
    /// Output features N (default: SD3.5 Large FFN width, 4 x 2432).
    #[arg(long, default_value_t = 9728)]
    n: usize,
    /// Rows of x to run (1 = one token / the modulation GEMV, 256 = a 256x256 image).
    #[arg(long, default_value = "1,256")]
    m: String,
    /// Group (block) size of the 4-bit weights.
    #[arg(long, default_value_t = 64)]
    group: usize,
    /// Seed of the generated weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the package at this path (default: a temporary folder, removed at exit).
    #[arg(long)]
    keep: Option<PathBuf>,
}

/// Layer names in the demo package.
const LAYERS: [(&str, &str); 4] = [
    ("f16", "demo.ff.dense_f16"),
    ("int4 rtn", "demo.ff.int4_rtn"),
    ("int4 clip", "demo.ff.int4_clip"),
    ("nf4", "demo.ff.nf4"),
];

/// Approximately normal samples (sum of four uniforms), with rare 8x outliers like the
/// heavy tails of trained transformer weights.
fn weight_sample(rng: &mut StdRng, std: f32) -> f32 {
    let s: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>() * 0.866;
    let outlier = if rng.random_range(0..1000) == 0 {
        8.0
    } else {
        1.0
    };
    s * std * outlier
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    let (n, k) = (args.n, args.k);
    let ms: Vec<usize> = args
        .m
        .split(',')
        .map(|s| s.trim().parse().ok().filter(|&m| m > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            Error::invalid(
                "--m",
                format!("`{}` is not a list of positive integers", args.m),
            )
        })?;
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(args.seed);
    eprintln!("[1/4] generating a seeded {n}x{k} layer ...");
    let weight: Vec<f32> = (0..n * k).map(|_| weight_sample(&mut rng, 0.02)).collect();
    let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();

    eprintln!(
        "[2/4] quantising to INT4 (round-to-nearest, then with the clipping search) and NF4 ..."
    );
    let t = Instant::now();
    let opts = Int4Options {
        group: args.group,
        ..Int4Options::default()
    };
    let int4 = quantize_int4(&weight, n, k, &opts)?;
    let int4_clip = quantize_int4(
        &weight,
        n,
        k,
        &Int4Options {
            clip_search: true,
            ..opts
        },
    )?;
    let nf4 = quantize_nf4(&weight, n, k, args.group)?;
    let quant_s = t.elapsed().as_secs_f64();

    let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let path = args
        .keep
        .clone()
        .unwrap_or_else(|| dir.path().join("demo.hpk"));
    eprintln!("[3/4] writing {} ...", path.display());
    let mut writer = PackageWriter::create(&path)?;
    let weight_f16: Vec<f16> = weight.iter().map(|&w| f16::from_f32(w)).collect();
    writer.add_dense_layer(
        LAYERS[0].1,
        Precision::F16,
        n,
        k,
        bytemuck::cast_slice(&weight_f16),
        Some(&bias),
    )?;
    writer.add_q4_layer(LAYERS[1].1, &int4, Some(&bias))?;
    writer.add_q4_layer(LAYERS[2].1, &int4_clip, Some(&bias))?;
    writer.add_q4_layer(LAYERS[3].1, &nf4, Some(&bias))?;
    drop((weight_f16, int4, int4_clip, nf4));
    let provenance = Provenance {
        source: format!("generated {n}x{k} layer, seed {}", args.seed),
        source_bytes: (n * k * 4) as u64,
        tool_version: hiprune::VERSION.to_string(),
        quantizer: format!(
            "int4 rtn-asymmetric g{0}, int4 clip-search g{0}, nf4 b{0}",
            args.group
        ),
        ..Provenance::default()
    };
    writer.finish(PackageInfo {
        architecture: None,
        kept_blocks: Vec::new(),
        provenance,
    })?;

    eprintln!("[4/4] mapping the package and running the kernels ...");
    let package = Package::open(&path)?;
    package.verify()?;
    let mut layers = Vec::new();
    for (label, name) in LAYERS {
        let weights = match package.layer(name)?.precision {
            Precision::F16 => LinearWeights::dense(
                DenseData::F16(package.dense_weight(name)?.f16_slice()?),
                n,
                k,
            )?,
            _ => LinearWeights::Q4(package.q4_layer(name)?),
        };
        let layer_bias = package.bias(name)?.map(|b| b.to_f32_vec()).transpose()?;
        let bytes = package_layer_bytes(&package, name)?;
        layers.push((label, weights, layer_bias, bytes));
    }
    let dense = LinearWeights::dense(DenseData::F32(&weight), n, k)?;

    let mut header = vec!["weights".to_string(), "bytes".into(), "vs f32".into()];
    for &m in &ms {
        header.push(format!("M={m} ms"));
        header.push(format!("M={m} speed-up"));
    }
    header.push("output rel. error".into());
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut table = Table::new(&header_refs);
    let f32_bytes = (n * k + n) * 4;
    let mut rows: Vec<Vec<String>> = vec![vec![
        "f32 (original)".into(),
        human_bytes(f32_bytes as u64),
        "1.00x".into(),
    ]];
    rows.extend(layers.iter().map(|(label, _, _, bytes)| {
        vec![
            label.to_string(),
            human_bytes(*bytes),
            format!("{:.2}x smaller", f32_bytes as f64 / *bytes as f64),
        ]
    }));
    let mut errors = vec![0.0f64; layers.len()];
    for &m in &ms {
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut reference = vec![0.0f32; m * n];
        let dense_s = median_time(|| linear(&x, m, &dense, Some(&bias), &mut reference))?;
        rows[0].push(format!("{:.3}", dense_s * 1e3));
        rows[0].push("1.00x".into());
        for (i, (_, weights, layer_bias, _)) in layers.iter().enumerate() {
            let mut y = vec![0.0f32; m * n];
            let s = median_time(|| linear(&x, m, weights, layer_bias.as_deref(), &mut y))?;
            rows[i + 1].push(format!("{:.3}", s * 1e3));
            rows[i + 1].push(format!("{:.2}x", dense_s / s));
            errors[i] = errors[i].max(relative_error(&y, &reference));
        }
    }
    rows[0].push("-".into());
    for (row, err) in rows.iter_mut().skip(1).zip(&errors) {
        row.push(format!("{err:.2e}"));
    }
    rows.into_iter().for_each(|r| table.row(r));

    println!(
        "hiprune demo: one {n}x{k} linear layer (SD3.5 Large FFN shape), group {}",
        args.group
    );
    println!(
        "cpu: {} | threads: {} | quantisation took {quant_s:.1} s | package {} ({})",
        cpu_model(),
        rayon::current_num_threads(),
        human_bytes(package.file_len()),
        path.display()
    );
    print!("{}", table.render());
    println!(
        "(output rel. error = ||y - y_f32|| / ||y_f32|| on random inputs; total {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Stored bytes of one layer (weight, scales, offsets, bias).
fn package_layer_bytes(package: &Package, layer: &str) -> Result<u64> {
    let entry = package.layer(layer)?;
    entry
        .tensor_names()
        .iter()
        .map(|t| package.tensor(t).map(|v| v.len() as u64))
        .sum()
}

/// Median wall time of a few runs after one warm-up run.
fn median_time(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (times.len() < 50 && start.elapsed().as_secs_f64() < 0.5) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// `||y - reference|| / ||reference||`.
fn relative_error(y: &[f32], reference: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in y.iter().zip(reference) {
        num += (f64::from(a) - f64::from(b)).powi(2);
        den += f64::from(b).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}
