//! Helpers shared by the MMDiT integration tests.
#![allow(dead_code)] // each test file uses a subset

use std::path::PathBuf;

use half::f16;
use hiprune::model::Tensor;
use hiprune::quant::{Q4Kind, Q4Matrix};
use rand::Rng;

/// A file or folder under `tests/fixtures/mmdit`.
/// Relative to the working directory when the source tree the test was built in is
/// gone (a test executable copied to another machine and run from the repository root).
pub fn fixture(name: &str) -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mmdit");
    let root = if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/fixtures/mmdit")
    };
    root.join(name)
}

/// A folder under `tests/fixtures/vae` (the VAE decoder fixtures).
pub fn vae_fixture(name: &str) -> PathBuf {
    fixture("../vae").join(name)
}

/// The diffusers reference outputs of VAE fixture `name`.
pub fn vae_reference(name: &str) -> hiprune::model::TensorFile {
    hiprune::model::TensorFile::open(vae_fixture(name).join("reference.safetensors")).unwrap()
}

/// The tiling the VAE fixtures' `image_tiled` was made with: 4-pixel latent tiles,
/// overlap 0.25.
pub const VAE_FIXTURE_TILES: hiprune::pipeline::Tiling = hiprune::pipeline::Tiling {
    latent_tile: 4,
    overlap: 0.25,
};

/// The CPU forward of `model` on the fixture folder's `inputs.safetensors`.
pub fn forward_on_fixture_inputs(model: &hiprune::model::Mmdit, folder: &str) -> Tensor {
    let inputs =
        hiprune::model::TensorFile::open(fixture(folder).join("inputs.safetensors")).unwrap();
    model
        .forward(&hiprune::model::MmditInputs {
            hidden_states: inputs.get("hidden_states").unwrap(),
            encoder_hidden_states: inputs.get("encoder_hidden_states").unwrap(),
            pooled_projections: inputs.get("pooled_projections").unwrap(),
            timestep: inputs.get("timestep").unwrap(),
        })
        .unwrap()
}

/// max|a - b| / max|b|, for tensors of the same shape and a non-zero reference.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    let max_ref = b.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max_err = a
        .data
        .iter()
        .zip(&b.data)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(max_ref > 0.0);
    max_err / max_ref
}

/// A fresh seed per run, printed so a failure can be replayed with HIPRUNE_TEST_SEED.
pub fn seeded_rng(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = std::env::var("HIPRUNE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("{test}: seed {seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// A random 4-bit matrix of `kind`: every code equally likely, scales in a range that
/// keeps outputs well inside f16, offsets (INT4 with offsets only) around the symmetric
/// `-8 * scale`.
pub fn random_q4(
    rng: &mut rand::rngs::StdRng,
    kind: Q4Kind,
    n: usize,
    k: usize,
    group: usize,
) -> Q4Matrix {
    let groups = n * (k / group);
    let packed = (0..n * k / 2)
        .map(|_| rng.random_range(0..=255u8))
        .collect();
    let scales: Vec<f16> = (0..groups)
        .map(|_| f16::from_f32(rng.random_range(0.002f32..0.03)))
        .collect();
    let offsets = if kind.has_offsets() {
        scales
            .iter()
            .map(|s| f16::from_f32(-s.to_f32() * rng.random_range(5.0f32..11.0)))
            .collect()
    } else {
        Vec::new()
    };
    Q4Matrix {
        kind,
        n,
        k,
        group,
        packed,
        scales,
        offsets,
    }
}

/// The CUDA backend on device 0, or `None` after printing why the test is skipped
/// (no device, or no cuBLAS, which the engine's dense layers need). Panics instead when
/// `HIPRUNE_REQUIRE_GPU=1` (set by the GPU check script), so a skip fails there.
#[cfg(feature = "cuda")]
pub fn gpu() -> Option<hiprune::backend::cuda::CudaBackend> {
    let skip = |why: String| {
        if std::env::var("HIPRUNE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("HIPRUNE_REQUIRE_GPU=1 but {why}");
        }
        println!("skipped: {why}");
        None
    };
    match hiprune::backend::cuda::CudaBackend::new(0) {
        Ok(_) if !hiprune::backend::cuda::cublas_present() => {
            skip("cuBLAS (libcublas.so) cannot be loaded".into())
        }
        Ok(b) => Some(b),
        Err(e) => skip(format!("no CUDA device: {e}")),
    }
}
