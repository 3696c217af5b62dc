//! A diffusers checkpoint folder (`config.json` and the shard index as fuzzed text, the
//! safetensors shard as fuzzed bytes), or a single-file checkpoint with Stability AI's
//! names (the shard alone).
//!
//! Input layout: `[config length: u16 LE][index length: u16 LE][config][index][shard]`.
//! Both lengths 0: the shard is a single-file checkpoint, read with 8-wide heads (the
//! fixtures'). An index length of 0 writes no index (a diffusers folder's single
//! file); otherwise the shard is written as `a.safetensors`, the name the seed indexes
//! use.
//!
//! Invariant: a checkpoint that loads into a model yields every tensor its plan requires
//! with exactly the element count its shape implies; anything else is a typed error.

#![no_main]

mod common;

use hiprune::backend::CpuBackend;
use hiprune::model::layout::{Required, required_tensors};
use hiprune::model::{Checkpoint, CheckpointOptions, Mmdit};
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
    let loaded = if config.is_empty() && index.is_empty() {
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, shard).expect("scratch write");
        let opts = CheckpointOptions {
            config: None,
            head_dim: Some(8),
        };
        Checkpoint::open(&path, &opts).and_then(|ck| Mmdit::from_checkpoint(CpuBackend::new(), ck))
    } else {
        write_folder(dir.path(), config, index, shard);
        Mmdit::load(dir.path())
    };
    let Ok(model) = loaded else {
        return;
    };
    for required in required_tensors(model.config(), model.prune_spec()) {
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

/// Writes a diffusers folder: `config.json`, the index when given, and the shard.
fn write_folder(dir: &std::path::Path, config: &[u8], index: &[u8], shard: &[u8]) {
    std::fs::write(dir.join("config.json"), config).expect("scratch write");
    let shard_name = if index.is_empty() {
        "diffusion_pytorch_model.safetensors"
    } else {
        std::fs::write(
            dir.join("diffusion_pytorch_model.safetensors.index.json"),
            index,
        )
        .expect("scratch write");
        "a.safetensors"
    };
    std::fs::write(dir.join(shard_name), shard).expect("scratch write");
}
