//! Int8-activation INT4 GEMM against dense f32 GEMM (`gemm` crate) on SD3.5 layer
//! shapes, both on two rayon threads. The int8 timing includes quantising the
//! activations. Throughput is reported in FLOP/s (2 * M * N * K per call).
//!
//! Run: `cargo bench --bench int8`; filter with e.g. `cargo bench --bench int8 -- M4096`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use gemm::Parallelism;
use half::f16;
use hiprune::backend::cpu::KernelPath;
use hiprune::backend::cpu::int8::linear_q4_int8;
use hiprune::quant::reference;
use hiprune::{Q4Kind, Q4Matrix};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const THREADS: usize = 2;
const GROUP: usize = 64;
/// (K, N) of SD3.5 linear layers: attention projections, MLP up, MLP down, and the
/// SD3.5-medium width.
const SHAPES: &[(usize, usize)] = &[(2432, 2432), (2432, 9728), (9728, 2432), (1536, 6144)];
const ROWS: &[usize] = &[4096, 256];

/// Approximately Gaussian samples (sum of four uniforms, unit variance).
fn gaussian(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let s: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum();
            s * 0.866_025_4
        })
        .collect()
}

/// A symmetric INT4 matrix with random codes and scales.
fn random_int4(rng: &mut StdRng, n: usize, k: usize) -> Q4Matrix {
    let groups = n * (k / GROUP);
    let scales: Vec<f16> = (0..groups)
        .map(|_| f16::from_f32(rng.random_range(0.002f32..0.01)))
        .collect();
    Q4Matrix {
        kind: Q4Kind::Int4,
        n,
        k,
        group: GROUP,
        packed: (0..n * k / 2)
            .map(|_| rng.random_range(0..=255u8))
            .collect(),
        offsets: scales
            .iter()
            .map(|s| f16::from_f32(-8.0 * s.to_f32()))
            .collect(),
        scales,
    }
}

/// `dst [M, N] = lhs [M, K] * W^T` with `W` an f32 `[N, K]` matrix.
fn dense_gemm(lhs: &[f32], w: &[f32], dst: &mut [f32], m: usize, n: usize, k: usize) {
    assert!(lhs.len() == m * k && w.len() == n * k && dst.len() == m * n);
    // SAFETY: the asserted lengths cover every element the strides address:
    // lhs (i, t) at i * K + t, rhs (t, j) = W[j, t] at j * K + t, dst (i, j) at i * N + j.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(THREADS),
        );
    }
}

/// Relative Frobenius error of int8 activations against the f32-activation f64
/// reference on Gaussian data, for `rows` rows of one layer shape.
fn report_error(path: KernelPath, rows: usize, k: usize, n: usize) {
    let mut rng = StdRng::seed_from_u64(7);
    let w = random_int4(&mut rng, n, k);
    let view = w.view().expect("valid matrix");
    let x = gaussian(&mut rng, rows * k);
    let want = reference::linear_q4(&x, rows, &view, None);
    let mut y = vec![0.0f32; rows * n];
    linear_q4_int8(path, &x, rows, &view, None, &mut y).expect("int8 linear");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&got, &r) in y.iter().zip(&want) {
        num += (f64::from(got) - r).powi(2);
        den += r * r;
    }
    println!(
        "int8-activation error, Gaussian x, M={rows} K={k} N={n} G={GROUP}: \
         relative Frobenius {:.3e}",
        (num / den).sqrt()
    );
}

fn main() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build_global()
        .expect("rayon pool");
    let path = KernelPath::detect();
    println!("int8 path: {path}, {THREADS} threads");
    report_error(path, 128, 2432, 2432);

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut rng = StdRng::seed_from_u64(1);
    for &(k, n) in SHAPES {
        let w = random_int4(&mut rng, n, k);
        let view = w.view().expect("valid matrix");
        let mut wf = vec![0.0f32; n * k];
        for (row, out) in wf.chunks_mut(k).enumerate() {
            view.dequantize_row(row, out);
        }
        for &m in ROWS {
            let x = gaussian(&mut rng, m * k);
            let mut y = vec![0.0f32; m * n];
            let mut group = c.benchmark_group(format!("M{m}_K{k}_N{n}"));
            group.throughput(Throughput::Elements((2 * m * n * k) as u64));
            group.bench_function(BenchmarkId::new("dense_f32_gemm", THREADS), |b| {
                b.iter(|| dense_gemm(black_box(&x), &wf, &mut y, m, n, k))
            });
            group.bench_function(BenchmarkId::new(format!("int8_{path}"), THREADS), |b| {
                b.iter(|| {
                    linear_q4_int8(path, black_box(&x), m, &view, None, &mut y).expect("linear")
                })
            });
            group.finish();
        }
    }
    c.final_summary();
}
