//! A diffusers checkpoint folder: `config.json` and the shard index as fuzzed text, the
//! safetensors shard as fuzzed bytes.
//!
//! Input layout: `[config length: u16 LE][index length: u16 LE][config][index][shard]`.
//! An index length of 0 writes no index (a single-file checkpoint named as diffusers
//! names it); otherwise the shard is written as `a.safetensors`, the name the seed
//! indexes use.
//!
//! Invariant: a folder that loads into a model yields every required tensor with exactly
//! the element count its shape implies; anything else is a typed error.

#![no_main]

mod common;

use hiprune::model::layout::{Required, required_tensors};
use hiprune::model::{Mmdit, PruneSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let config_len = u16::from_le_bytes([data[0], data[1]]) as usize;
    let index_len = u16::from_le_bytes([data[2], data[3]]) as usize;
    let rest = &data[4..];
    if rest.len() < config_len + index_len {
        return;
    }
    let (config, rest) = rest.split_at(config_len);
    let (index, shard) = rest.split_at(index_len);
    let dir = common::scratch_dir();
    std::fs::write(dir.path().join("config.json"), config).expect("scratch write");
    let shard_name = if index.is_empty() {
        "diffusion_pytorch_model.safetensors"
    } else {
        std::fs::write(
            dir.path()
                .join("diffusion_pytorch_model.safetensors.index.json"),
            index,
        )
        .expect("scratch write");
        "a.safetensors"
    };
    std::fs::write(dir.path().join(shard_name), shard).expect("scratch write");

    let Ok(model) = Mmdit::load(dir.path()) else {
        return;
    };
    for required in required_tensors(model.config(), &PruneSpec::none()) {
        match required {
            Required::Linear { name, n, k } => {
                let w = model
                    .weights()
                    .linear(&name, n, k)
                    .expect("a validated linear opens");
                assert_eq!((w.n(), w.k()), (n, k), "{name}");
            }
            Required::Plain { name, shape } => {
                let t = model
                    .weights()
                    .f32_tensor(&name, &shape)
                    .expect("a validated tensor reads");
                assert_eq!(t.len(), shape.iter().product::<usize>(), "{name}");
            }
        }
    }
});
