//! Criterion benches: 4-bit (INT4, NF4) large-M linear layers against dense f32 through
//! the `gemm` crate, at SD3.5 layer shapes. Ratios are only meaningful within one run.
//!
//! `cargo bench --bench linear`; the thread count follows `RAYON_NUM_THREADS`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::f16;
use hiprune::backend::cpu::linear;
use hiprune::quant::{DenseData, LinearWeights};
use hiprune::quant::{Q4Kind, Q4Weights};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use std::time::Duration;

/// (K, N) of SD3.5 linears: attention, the 6D modulation, the FFN up and down
/// projections of SD3.5 Large (D = 2432), and the FFN up projection of SD3.5 Medium.
const SHAPES: &[(usize, usize)] = &[
    (2432, 2432),
    (2432, 14592),
    (2432, 9728),
    (9728, 2432),
    (1536, 6144),
];
const GROUP: usize = 64;

struct Q4Data {
    packed: Vec<u8>,
    scales: Vec<f16>,
    offsets: Vec<f16>,
}

fn q4_data(rng: &mut StdRng, kind: Q4Kind, n: usize, k: usize) -> Q4Data {
    let groups = n * k / GROUP;
    Q4Data {
        packed: (0..n * k / 2).map(|_| rng.random()).collect(),
        scales: (0..groups)
            .map(|_| f16::from_f32(rng.random_range(0.001..0.01)))
            .collect(),
        offsets: match kind {
            Q4Kind::Int4 => (0..groups)
                .map(|_| f16::from_f32(rng.random_range(-0.08..0.0)))
                .collect(),
            Q4Kind::Nf4 | Q4Kind::Int4Sym => Vec::new(),
        },
    }
}

fn bench_gemm(c: &mut Criterion, m: usize, shapes: &[(usize, usize)]) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut group = c.benchmark_group(format!("linear_m{m}"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for &(k, n) in shapes {
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut y = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let shape = format!("{k}x{n}");
        let dense: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.05..0.05)).collect();
        let w = LinearWeights::dense(DenseData::F32(&dense), n, k).unwrap();
        group.bench_function(BenchmarkId::new("dense_f32", &shape), |b| {
            b.iter(|| linear(black_box(&x), m, &w, None, &mut y).unwrap())
        });
        drop(dense);
        for kind in [Q4Kind::Int4, Q4Kind::Nf4] {
            let d = q4_data(&mut rng, kind, n, k);
            let q = Q4Weights::new(kind, n, k, GROUP, &d.packed, &d.scales, &d.offsets).unwrap();
            group.bench_function(BenchmarkId::new(kind.name(), &shape), |b| {
                b.iter(|| linear(black_box(&x), m, &LinearWeights::Q4(q), None, &mut y).unwrap())
            });
        }
    }
    group.finish();
}

fn gemm_m256(c: &mut Criterion) {
    bench_gemm(c, 256, SHAPES);
}

/// M = 4096 (1024x1024 images) costs seconds per call: two shapes keep the run short;
/// `hiprune bench kernels --m 4096` covers the rest.
fn gemm_m4096(c: &mut Criterion) {
    bench_gemm(c, 4096, &[(2432, 2432), (1536, 6144)]);
}

criterion_group!(benches, gemm_m256, gemm_m4096);
criterion_main!(benches);
