//! `.hpk` opening and manifest validation from arbitrary bytes.
//!
//! Invariant: a file that opens yields views that are in bounds (reading every byte is
//! safe) and whose byte length equals shape x dtype size; every 4-bit layer view is a
//! consistent `Q4Weights`; verification either passes or names a checksum mismatch.
//! Anything else is a typed error.

#![no_main]

mod common;

use hiprune::format::Precision;
use hiprune::{Error, Package};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch_dir();
    let path = dir.path().join("fuzz.hpk");
    std::fs::write(&path, data).expect("scratch write");
    let Ok(package) = Package::open(&path) else {
        return;
    };
    let file_len = package.file_len() as usize;
    let mut total = 0usize;
    let names: Vec<String> = package.tensor_names().map(str::to_string).collect();
    for name in &names {
        let view = package.tensor(name).expect("a listed tensor opens");
        let elements: usize = view.shape().iter().product();
        assert_eq!(view.bytes().len(), elements * view.dtype().size(), "{name}");
        assert_eq!(view.len(), elements, "{name}");
        total += view.bytes().len();
        // Touch every byte: out-of-bounds views would fault here.
        std::hint::black_box(view.bytes().iter().fold(0u8, |a, &b| a ^ b));
    }
    assert!(
        total <= file_len,
        "views cover more bytes than the file holds"
    );
    for layer in &package.manifest().layers {
        match layer.precision {
            // A computed table stores no tensors.
            Precision::Sincos2d { .. } => {}
            p if p.q4().is_some() => {
                let w = package
                    .q4_layer(&layer.name)
                    .expect("a declared 4-bit layer opens");
                assert_eq!(w.n() as u64, layer.out_features);
                assert_eq!(w.k() as u64, layer.in_features);
                let mut row = vec![0.0f32; w.k()];
                w.dequantize_row(w.n() - 1, &mut row);
            }
            _ => {
                let view = package
                    .dense_weight(&layer.name)
                    .expect("a declared dense layer opens");
                assert_eq!(view.len() as u64, layer.out_features * layer.in_features);
            }
        }
    }
    match package.verify() {
        Ok(()) | Err(Error::ChecksumMismatch { .. }) => {}
        Err(other) => panic!("verify gave an unexpected error: {other}"),
    }
});
