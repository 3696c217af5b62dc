//! `generate_checkpoint` writes the same bytes for the same seed, release after
//! release: the CRC-32 of each shard is pinned to the output of the original
//! sequential generator.

use std::path::Path;

use hiprune::compress::{GenerateOptions, Preset, generate_checkpoint};

fn shard_crc(dir: &Path) -> (u64, u32) {
    let path = dir.join("diffusion_pytorch_model-00001-of-00001.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    (bytes.len() as u64, crc32fast::hash(&bytes))
}

fn generate(preset: Preset, layers: Option<usize>, seed: u64, f16: bool) -> (u64, u32) {
    let mut config = preset.config();
    if let Some(n) = layers {
        config = GenerateOptions::with_layers(config, n);
    }
    let dir = tempfile::tempdir().unwrap();
    let summary = generate_checkpoint(
        dir.path(),
        &GenerateOptions {
            seed,
            f16,
            ..GenerateOptions::new(config)
        },
    )
    .unwrap();
    assert_eq!(summary.shards.len(), 1);
    shard_crc(dir.path())
}

#[test]
fn tiny_f16_seed0_is_pinned() {
    assert_eq!(
        generate(Preset::Tiny, None, 0, true),
        (1_243_224, 0x096d_15c0)
    );
}

#[test]
fn tiny_f32_seed7_is_pinned() {
    assert_eq!(
        generate(Preset::Tiny, None, 7, false),
        (2_472_032, 0xabb9_523c)
    );
}

/// Real SD3.5-Medium shapes (one dual-attention block, the 384x384 positional
/// table): tensors of millions of elements, made in many parallel pieces.
#[test]
fn sd35_medium_one_block_seed3_is_pinned() {
    assert_eq!(
        generate(Preset::Sd35Medium, Some(1), 3, true),
        (633_585_256, 0x09aa_9a65)
    );
}

#[test]
fn different_seeds_differ() {
    assert_ne!(
        generate(Preset::Tiny, None, 1, true),
        generate(Preset::Tiny, None, 2, true)
    );
}
