//! Criterion bench: one denoising step (one transformer forward, batch 1) of a
//! generated SD3.5-Medium-shaped MMDiT (D = 1536, 24 heads, RMS qk-norm, MMDiT-X dual
//! attention in every block but the last) at 256 x 256 pixels = a 32 x 32 latent = 256 image tokens,
//! with 77 context tokens. Seeded random weights, dense f32 against INT4 group 64.
//!
//! Only `HIPRUNE_BENCH_BLOCKS` blocks (default 2) are generated: the full 24-block model
//! needs about 10 GB in f32. Per-block cost is what the bench compares.
//!
//! `cargo bench --bench mmdit_step`; the thread count follows `RAYON_NUM_THREADS`.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use half::f16;
use hiprune::model::layout::{Required, required_tensors};
use hiprune::model::{MemoryTensor, Mmdit, MmditConfig, MmditInputs, PruneSpec, Tensor, Weights};
use hiprune::quant::{Q4Kind, Q4Matrix};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const GROUP: usize = 64;

fn config() -> MmditConfig {
    let blocks = std::env::var("HIPRUNE_BENCH_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2usize)
        .clamp(1, 24);
    let mut cfg = MmditConfig::sd35_medium();
    cfg.num_layers = blocks;
    // Dual attention in the first blocks, never in the last (as in SD3.5 Medium).
    cfg.dual_attention_layers = (0..(blocks - 1).min(13)).collect();
    cfg
}

fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn q4(rng: &mut StdRng, n: usize, k: usize) -> Q4Matrix {
    let groups = n * k / GROUP;
    Q4Matrix {
        kind: Q4Kind::Int4,
        n,
        k,
        group: GROUP,
        packed: (0..n * k / 2).map(|_| rng.random()).collect(),
        scales: (0..groups)
            .map(|_| f16::from_f32(rng.random_range(0.001..0.004)))
            .collect(),
        offsets: (0..groups)
            .map(|_| f16::from_f32(rng.random_range(-0.03..-0.01)))
            .collect(),
    }
}

fn model(cfg: &MmditConfig, int4: bool) -> Mmdit {
    let mut rng = StdRng::seed_from_u64(1);
    let mut map = HashMap::new();
    for req in required_tensors(cfg, &PruneSpec::none()) {
        match req {
            Required::Linear { name, n, k } => {
                let w = if int4 && k.is_multiple_of(GROUP) {
                    MemoryTensor::Q4(q4(&mut rng, n, k))
                } else {
                    let s = 1.0 / (k as f32).sqrt();
                    MemoryTensor::F32(Tensor::new(uniform(&mut rng, n * k, s), vec![n, k]).unwrap())
                };
                map.insert(format!("{name}.weight"), w);
                let b = Tensor::new(uniform(&mut rng, n, 0.01), vec![n]).unwrap();
                map.insert(format!("{name}.bias"), MemoryTensor::F32(b));
            }
            Required::Plain { name, shape } => {
                let len = shape.iter().product();
                let t = Tensor::new(uniform(&mut rng, len, 0.5), shape).unwrap();
                map.insert(name, MemoryTensor::F32(t));
            }
        }
    }
    Mmdit::new(cfg.clone(), Weights::from_memory(map), PruneSpec::none()).unwrap()
}

fn bench(c: &mut Criterion) {
    let cfg = config();
    let mut rng = StdRng::seed_from_u64(2);
    let hs = Tensor::new(uniform(&mut rng, 16 * 32 * 32, 1.0), vec![1, 16, 32, 32]).unwrap();
    let ehs = Tensor::new(uniform(&mut rng, 77 * 4096, 1.0), vec![1, 77, 4096]).unwrap();
    let pooled = Tensor::new(uniform(&mut rng, 2048, 1.0), vec![1, 2048]).unwrap();
    let t = Tensor::new(vec![500.0], vec![1]).unwrap();
    let inputs = MmditInputs {
        hidden_states: &hs,
        encoder_hidden_states: &ehs,
        pooled_projections: &pooled,
        timestep: &t,
    };
    let mut group = c.benchmark_group(format!("mmdit_step/sd35m_{}blocks_256px", cfg.num_layers));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    for (label, int4) in [("f32", false), ("int4_g64", true)] {
        let m = model(&cfg, int4);
        group.bench_function(label, |b| b.iter(|| black_box(m.forward(&inputs).unwrap())));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
