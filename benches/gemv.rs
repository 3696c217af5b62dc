//! M = 1 fused 4-bit GEMV (INT4 and NF4, G = 64) against a dense f32 GEMV through the
//! `gemm` crate, on SD3-sized layer shapes, with 2 rayon threads.
//!
//! "streamed": every call uses the next of several distinct weight copies whose total
//! exceeds the last-level cache several times, so weights come from DRAM, as in a real
//! model step. "cached": one copy, called repeatedly.
//!
//! After the criterion groups a summary measured in the same run prints each kernel's
//! weight-byte throughput, its share of the measured memory read bandwidth
//! (`membw::measure_read_bandwidth`) and its speed-up over the dense GEMV.
//!
//! Run: `cargo bench --bench gemv` (add `-- --quick` for a faster criterion pass).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use half::f16;
use hiprune::backend::cpu::KernelPath;
use hiprune::backend::cpu::gemv::gemv_q4;
use hiprune::backend::cpu::membw::measure_read_bandwidth;
use hiprune::{Q4Kind, Q4Matrix, Q4Weights};

/// Rayon threads (the bench machine has 2 cores).
const THREADS: usize = 2;
/// Group size of the 4-bit weights.
const GROUP: usize = 64;
/// Streamed weights rotate over copies totalling at least this many bytes (4x a 32 MB L3).
const STREAM_BYTES: usize = 128 << 20;
/// `(K, N)` shapes: SD3-medium/large attention and MLP projections.
const SHAPES: &[(usize, usize)] = &[
    (2432, 2432),
    (2432, 14592),
    (2432, 9728),
    (9728, 2432),
    (1536, 6144),
];

/// A small xorshift generator: filling hundreds of MB must be quick.
struct Fill(u64);

impl Fill {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn q4_matrix(kind: Q4Kind, n: usize, k: usize, seed: u64) -> Q4Matrix {
    let mut r = Fill(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let groups = n * k / GROUP;
    let mut packed = vec![0u8; n * k / 2];
    for c in packed.chunks_mut(8) {
        let v = r.next().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    let scales = (0..groups)
        .map(|_| f16::from_f32(0.005 + 0.02 * r.unit()))
        .collect();
    let offsets = if kind.has_offsets() {
        (0..groups)
            .map(|_| f16::from_f32(-0.1 * r.unit()))
            .collect()
    } else {
        Vec::new()
    };
    Q4Matrix {
        kind,
        n,
        k,
        group: GROUP,
        packed,
        scales,
        offsets,
    }
}

fn dense_matrix(n: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut r = Fill(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..n * k).map(|_| r.unit() - 0.5).collect()
}

fn copies_for(bytes: usize) -> usize {
    STREAM_BYTES.div_ceil(bytes).max(2)
}

/// `y[1, N] = x[1, K] * W^T` with dense `W [N, K]` through `gemm`.
fn dense_gemv(x: &[f32], w: &[f32], n: usize, k: usize, y: &mut [f32]) {
    assert!(x.len() == k && w.len() == n * k && y.len() == n);
    // SAFETY: the strides describe x as [1, K] row-major, W^T as [K, N] read from the
    // row-major [N, K] buffer, and y as [1, N]; the asserts above check every length.
    unsafe {
        gemm::gemm(
            1,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
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
            gemm::Parallelism::Rayon(THREADS),
        );
    }
}

/// One benchmarked kernel on one shape: its weight copies and a call.
enum Kernel {
    Q4(Vec<Q4Matrix>),
    Dense(Vec<Vec<f32>>),
}

impl Kernel {
    fn build(name: &str, n: usize, k: usize, streamed: bool) -> Kernel {
        match name {
            "dense_f32" => {
                let copies = if streamed { copies_for(n * k * 4) } else { 1 };
                Kernel::Dense(
                    (0..copies)
                        .map(|c| dense_matrix(n, k, c as u64 + 1))
                        .collect(),
                )
            }
            _ => {
                let kind = if name == "int4" {
                    Q4Kind::Int4
                } else {
                    Q4Kind::Nf4
                };
                let one = q4_matrix(kind, n, k, 1);
                let bytes = one.view().map_or(1, |w| w.nbytes());
                let copies = if streamed { copies_for(bytes) } else { 1 };
                let mut all = vec![one];
                all.extend((1..copies).map(|c| q4_matrix(kind, n, k, c as u64 + 1)));
                Kernel::Q4(all)
            }
        }
    }

    /// Weight bytes one call reads.
    fn bytes(&self) -> usize {
        match self {
            Kernel::Q4(m) => m[0].view().map_or(0, |w| w.nbytes()),
            Kernel::Dense(d) => d[0].len() * 4,
        }
    }

    fn copies(&self) -> usize {
        match self {
            Kernel::Q4(m) => m.len(),
            Kernel::Dense(d) => d.len(),
        }
    }

    /// Runs call number `i` (which picks the weight copy).
    fn call(&self, views: &[Q4Weights<'_>], path: KernelPath, x: &[f32], y: &mut [f32], i: usize) {
        match self {
            Kernel::Q4(_) => {
                let w = &views[i % views.len()];
                gemv_q4(path, x, 1, w, None, y).expect("gemv_q4");
            }
            Kernel::Dense(d) => {
                let w = &d[i % d.len()];
                dense_gemv(x, w, y.len(), x.len(), y);
            }
        }
    }

    fn views(&self) -> Vec<Q4Weights<'_>> {
        match self {
            Kernel::Q4(m) => m.iter().map(|m| m.view().expect("valid matrix")).collect(),
            Kernel::Dense(_) => Vec::new(),
        }
    }
}

const KERNELS: &[&str] = &["int4", "nf4", "dense_f32"];

/// Seconds per call: the median of several timed batches.
fn time_per_call(kernel: &Kernel, path: KernelPath, x: &[f32], y: &mut [f32]) -> f64 {
    let views = kernel.views();
    let per_batch = (2 * kernel.copies()).max(16);
    let mut i = 0;
    for _ in 0..per_batch {
        kernel.call(&views, path, x, y, i);
        i += 1;
    }
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                kernel.call(&views, path, x, y, i);
                i += 1;
            }
            t.elapsed().as_secs_f64() / per_batch as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    black_box(&y);
    times[times.len() / 2]
}

fn main() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build_global()
        .expect("rayon pool");
    let path = KernelPath::detect();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();

    for streamed in [true, false] {
        let label = if streamed { "streamed" } else { "cached" };
        let mut group = c.benchmark_group(format!("gemv_m1_{label}_{path}"));
        for &(k, n) in SHAPES {
            let x: Vec<f32> = dense_matrix(1, k, 99);
            let mut y = vec![0.0f32; n];
            for &name in KERNELS {
                let kernel = Kernel::build(name, n, k, streamed);
                let views = kernel.views();
                group.throughput(Throughput::Bytes(kernel.bytes() as u64));
                let mut i = 0;
                group.bench_function(BenchmarkId::new(name, format!("k{k}_n{n}")), |b| {
                    b.iter(|| {
                        kernel.call(&views, path, &x, &mut y, i);
                        i += 1;
                    })
                });
            }
        }
        group.finish();
    }
    c.final_summary();

    // Summary from one run: bandwidth first, then each shape's kernels back to back.
    let bw = measure_read_bandwidth(512 << 20, THREADS);
    println!();
    println!("read bandwidth ({THREADS} threads, 512 MiB): {bw:.2} GB/s; kernel path {path}");
    println!(
        "{:<9} {:>6} {:>6} {:<10} {:>10} {:>8} {:>8} {:>9}",
        "mode", "K", "N", "kernel", "us/call", "GB/s", "% of bw", "x dense"
    );
    for streamed in [true, false] {
        let label = if streamed { "streamed" } else { "cached" };
        for &(k, n) in SHAPES {
            let x: Vec<f32> = dense_matrix(1, k, 99);
            let mut y = vec![0.0f32; n];
            let mut secs = Vec::new();
            for &name in KERNELS {
                let kernel = Kernel::build(name, n, k, streamed);
                let t = time_per_call(&kernel, path, &x, &mut y);
                secs.push((name, t, kernel.bytes()));
            }
            let dense = secs.last().map_or(f64::NAN, |s| s.1);
            for (name, t, bytes) in secs {
                let gbs = bytes as f64 / t / 1e9;
                println!(
                    "{label:<9} {k:>6} {n:>6} {name:<10} {:>10.1} {gbs:>8.2} {:>7.0}% {:>8.2}x",
                    t * 1e6,
                    100.0 * gbs / bw,
                    dense / t
                );
            }
        }
    }
}
