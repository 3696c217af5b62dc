//! Quantise a linear layer to INT4, store it in a `.hpk` package, map the package back
//! and run the layer with the fused CPU kernel.
//!
//! `cargo run --release --example quickstart`

use hiprune::backend::cpu::linear;
use hiprune::format::{PackageInfo, Provenance};
use hiprune::quant::LinearWeights;
use hiprune::quant::{Int4Options, quantize_int4};
use hiprune::{Package, PackageWriter};

fn main() -> hiprune::Result<()> {
    // A 1536 x 1536 layer (SD3.5 Medium's attention projection) with made-up weights.
    let (n, k) = (1536, 1536);
    let weight: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 2001) as f32 - 1000.0) * 2e-5)
        .collect();

    // INT4, group 64, asymmetric round-to-nearest with the per-group clipping search.
    let opts = Int4Options {
        group: 64,
        symmetric: false,
        clip_search: true,
    };
    let int4 = quantize_int4(&weight, n, k, &opts)?;

    // Write the package atomically, then open it: memory map + full validation.
    let dir = tempfile::tempdir().map_err(|e| hiprune::Error::io(std::env::temp_dir(), e))?;
    let path = dir.path().join("layer.hpk");
    let mut writer = PackageWriter::create(&path)?;
    writer.add_q4_layer("attn.to_q", &int4, None)?;
    writer.finish(PackageInfo {
        provenance: Provenance::default(),
        ..PackageInfo::default()
    })?;
    let package = Package::open(&path)?;

    // Run one token through the layer, straight from the memory map.
    let w = package.q4_layer("attn.to_q")?;
    let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.01).sin()).collect();
    let mut y = vec![0.0f32; n];
    linear(&x, 1, &LinearWeights::Q4(w), None, &mut y)?;

    let dense = hiprune::quant::DenseData::F32(&weight);
    let mut y_f32 = vec![0.0f32; n];
    linear(&x, 1, &LinearWeights::dense(dense, n, k)?, None, &mut y_f32)?;
    let err: f32 = y
        .iter()
        .zip(&y_f32)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        .sqrt()
        / y_f32.iter().map(|b| b * b).sum::<f32>().sqrt();
    println!(
        "package {} bytes (f32 layer: {} bytes); relative output error of INT4: {err:.2e}",
        package.file_len(),
        n * k * 4
    );
    Ok(())
}
