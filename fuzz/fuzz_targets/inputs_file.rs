//! The forward/sample inputs file (safetensors of f32/f16/bf16 tensors), run through
//! the input checks and, when they pass, a forward pass of the tiny SD3 fixture model.
//!
//! Invariant: a file that opens holds tensors whose data length equals their shape's
//! element count; inputs either run (an output of the latent's shape) or give a typed
//! error naming the problem.

#![no_main]

mod common;

use std::sync::OnceLock;

use hiprune::model::{Mmdit, MmditInputs, TensorFile};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 4] = [
    "hidden_states",
    "encoder_hidden_states",
    "pooled_projections",
    "timestep",
];

fn model() -> &'static Mmdit {
    static MODEL: OnceLock<Mmdit> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/mmdit/sd3");
        Mmdit::load(dir).expect("the sd3 fixture loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch_dir();
    let path = dir.path().join("inputs.safetensors");
    std::fs::write(&path, data).expect("scratch write");
    let Ok(file) = TensorFile::open(&path) else {
        return;
    };
    for name in NAMES {
        if let Ok(t) = file.get(name) {
            assert_eq!(t.data.len(), t.shape.iter().product::<usize>(), "{name}");
        }
    }
    let (Ok(h), Ok(c), Ok(p), Ok(t)) = (
        file.get(NAMES[0]),
        file.get(NAMES[1]),
        file.get(NAMES[2]),
        file.get(NAMES[3]),
    ) else {
        return;
    };
    // Keep each execution short: the fixture's table allows at most 144 patches.
    if c.data.len() > 1 << 16 {
        return;
    }
    let inputs = MmditInputs {
        hidden_states: h,
        encoder_hidden_states: c,
        pooled_projections: p,
        timestep: t,
    };
    if let Ok(out) = model().forward(&inputs) {
        assert_eq!(out.shape, h.shape);
        assert_eq!(out.data.len(), h.data.len());
    }
});
