//! Helpers shared by the MMDiT integration tests.
#![allow(dead_code)] // each test file uses a subset

use std::path::PathBuf;

use hiprune::model::Tensor;

/// A file or folder under `tests/fixtures/mmdit`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mmdit")
        .join(name)
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
