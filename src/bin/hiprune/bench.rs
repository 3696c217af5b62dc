//! `hiprune bench kernels`: 4-bit linear kernels against the dense f32 baseline, on the
//! linear shapes of SD3.5 models, measured in one run.

use std::time::Instant;

use clap::{Args, Subcommand};
use half::f16;
use hiprune::backend::cpu::{DenseData, KernelPath, LinearWeights, int8, linear, membw};
use hiprune::quant::{Q4Kind, Q4Weights};
use hiprune::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::report::{Table, cpu_model, git_revision};

/// What to benchmark.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Linear-layer kernels: INT4/NF4 against dense f32 at each shape and M.
    Kernels(KernelArgs),
}

/// Options of `hiprune bench kernels`.
#[derive(Args)]
pub struct KernelArgs {
    /// Backend to run on (only `cpu` in this build).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Shapes: `sd35-large`, `sd35-medium`, or `K,N;K,N;...`.
    #[arg(long, default_value = "sd35-large")]
    shapes: String,
    /// Rows of x (tokens), comma-separated.
    #[arg(long, default_value = "1,256")]
    m: String,
    /// Kernels to compare with the dense f32 baseline: `int4`, `nf4`, `int4sym` (f32 activations)
    /// and `int4-a8` (INT4 weights, per-token int8 activations).
    #[arg(long, default_value = "int4,nf4")]
    weights: String,
    /// Group (block) size of the 4-bit weights.
    #[arg(long, default_value_t = 64)]
    group: usize,
    /// Threads (default: all cores, or RAYON_NUM_THREADS).
    #[arg(long)]
    threads: Option<usize>,
    /// Keep one copy of each weight matrix (cache-resident) instead of rotating over
    /// enough copies to stream weights from memory.
    #[arg(long)]
    hot: bool,
    /// Time budget per measurement, seconds.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Copies of the weights to rotate over when streaming: together they exceed any L3.
const STREAM_BYTES: usize = 96 << 20;

#[derive(Serialize)]
struct Measurement {
    k: usize,
    n: usize,
    m: usize,
    weights: String,
    weight_bytes: usize,
    median_s: f64,
    min_s: f64,
    max_s: f64,
    gbps: f64,
    gflops: f64,
    speedup_vs_f32: f64,
}

#[derive(Serialize)]
struct KernelReport {
    cpu: String,
    threads: usize,
    kernel_path: String,
    git_revision: String,
    streamed: bool,
    read_bandwidth_gbps: f64,
    results: Vec<Measurement>,
}

/// Runs a bench subcommand.
pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Kernels(args) => kernels(&args),
    }
}

/// Named shape sets: every distinct linear shape (K, N) of the model family's blocks.
fn parse_shapes(spec: &str) -> Result<Vec<(usize, usize)>> {
    match spec {
        // D = 2432: attention, 6D modulation, FFN up/down, context embedder.
        "sd35-large" => Ok(vec![
            (2432, 2432),
            (2432, 14592),
            (2432, 9728),
            (9728, 2432),
            (4096, 2432),
        ]),
        // D = 1536: attention, 9D (MMDiT-X) and 6D modulation, FFN up/down.
        "sd35-medium" => Ok(vec![
            (1536, 1536),
            (1536, 13824),
            (1536, 9216),
            (1536, 6144),
            (6144, 1536),
        ]),
        custom => custom
            .split(';')
            .filter(|s| !s.trim().is_empty())
            .map(|pair| {
                let dims: Vec<&str> = pair.split(',').map(str::trim).collect();
                match dims.as_slice() {
                    [k, n] => match (k.parse::<usize>(), n.parse::<usize>()) {
                        (Ok(k), Ok(n)) if k > 0 && n > 0 => Ok((k, n)),
                        _ => Err(Error::invalid(
                            "--shapes",
                            format!("`{pair}` is not K,N with positive integers"),
                        )),
                    },
                    _ => Err(Error::invalid(
                        "--shapes",
                        format!("`{pair}` is not a shape; use sd35-large, sd35-medium or K,N;K,N"),
                    )),
                }
            })
            .collect(),
    }
}

fn parse_list(flag: &str, spec: &str) -> Result<Vec<usize>> {
    spec.split(',')
        .map(|s| match s.trim().parse::<usize>() {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(Error::invalid(
                flag,
                format!("`{s}` is not a positive integer"),
            )),
        })
        .collect()
}

/// A 4-bit kernel variant to compare with the dense baseline.
#[derive(Clone, Copy)]
enum Variant {
    /// f32 activations, INT4 or NF4 weights.
    Q4(Q4Kind),
    /// INT4 weights with per-token int8 activations (integer dot products).
    Int4Int8Activations,
}

impl Variant {
    fn kind(self) -> Q4Kind {
        match self {
            Variant::Q4(kind) => kind,
            Variant::Int4Int8Activations => Q4Kind::Int4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Q4(kind) => kind.name(),
            Variant::Int4Int8Activations => "int4-a8",
        }
    }

    fn run(self, x: &[f32], m: usize, w: Q4Weights<'_>, y: &mut [f32]) -> Result<()> {
        match self {
            Variant::Q4(_) => linear(x, m, &LinearWeights::Q4(w), None, y),
            Variant::Int4Int8Activations => {
                int8::linear_q4_int8(KernelPath::detect(), x, m, &w, None, y)
            }
        }
    }
}

fn parse_kinds(spec: &str) -> Result<Vec<Variant>> {
    spec.split(',')
        .map(|s| match s.trim() {
            "int4" => Ok(Variant::Q4(Q4Kind::Int4)),
            "nf4" => Ok(Variant::Q4(Q4Kind::Nf4)),
            "int4sym" => Ok(Variant::Q4(Q4Kind::Int4Sym)),
            "int4-a8" => Ok(Variant::Int4Int8Activations),
            other => Err(Error::invalid(
                "--weights",
                format!("`{other}` is not one of int4, nf4, int4sym, int4-a8"),
            )),
        })
        .collect()
}

/// Runs `f` until the time budget is spent (at least 3, at most 200 runs, after one
/// warm-up run) and returns the sorted run times.
fn time_runs(seconds: f64, mut f: impl FnMut(usize) -> Result<()>) -> Result<Vec<f64>> {
    f(0)?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (times.len() < 200 && start.elapsed().as_secs_f64() < seconds) {
        let t = Instant::now();
        f(times.len() + 1)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

fn kernels(args: &KernelArgs) -> Result<()> {
    if args.backend != "cpu" {
        return Err(Error::Unsupported {
            what: format!("backend `{}` in this build (available: cpu)", args.backend),
        });
    }
    let shapes = parse_shapes(&args.shapes)?;
    let ms = parse_list("--m", &args.m)?;
    let kinds = parse_kinds(&args.weights)?;
    let threads = args.threads.unwrap_or_else(rayon::current_num_threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::invalid("--threads", e.to_string()))?;
    pool.install(|| kernels_in_pool(args, &shapes, &ms, &kinds, threads))
}

fn kernels_in_pool(
    args: &KernelArgs,
    shapes: &[(usize, usize)],
    ms: &[usize],
    kinds: &[Variant],
    threads: usize,
) -> Result<()> {
    let path = KernelPath::detect();
    eprintln!("measuring memory read bandwidth ...");
    let read_bw = membw::measure_read_bandwidth(256 << 20, threads);
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut results = Vec::new();
    let total = shapes.len() * ms.len();
    for (i, &(k, n)) in shapes.iter().enumerate() {
        for kind in kinds {
            hiprune::quant::check_q4_dims(kind.kind(), "--shapes", k, args.group)?;
        }
        let copies = |bytes: usize| {
            if args.hot {
                1
            } else {
                STREAM_BYTES.div_ceil(bytes).max(1)
            }
        };
        let dense: Vec<Vec<f32>> = (0..copies(n * k * 4))
            .map(|_| {
                (0..n * k)
                    .map(|_| rng.random_range(-0.05f32..0.05))
                    .collect()
            })
            .collect();
        let q4: Vec<(Variant, Vec<Q4Data>)> = kinds
            .iter()
            .map(|&kind| {
                let bytes = n * k / 2 + n * k / args.group * 4;
                (
                    kind,
                    (0..copies(bytes))
                        .map(|_| Q4Data::random(&mut rng, kind.kind(), n, k, args.group))
                        .collect(),
                )
            })
            .collect();
        for (j, &m) in ms.iter().enumerate() {
            eprintln!("[{}/{total}] K={k} N={n} M={m}", i * ms.len() + j + 1);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut y = vec![0.0f32; m * n];
            let flops = 2.0 * (m * n * k) as f64;
            let act_bytes = 4 * (m * k + m * n);
            let dense_times = time_runs(args.seconds, |run| {
                let w = LinearWeights::dense(DenseData::F32(&dense[run % dense.len()]), n, k)?;
                linear(&x, m, &w, None, &mut y)
            })?;
            let dense_median = dense_times[dense_times.len() / 2];
            results.push(measurement(
                k,
                n,
                m,
                "f32",
                n * k * 4,
                act_bytes,
                flops,
                &dense_times,
                dense_median,
            ));
            for (kind, copies) in &q4 {
                let views = copies
                    .iter()
                    .map(|d| d.view(kind.kind(), n, k, args.group))
                    .collect::<Result<Vec<_>>>()?;
                let times = time_runs(args.seconds, |run| {
                    kind.run(&x, m, views[run % views.len()], &mut y)
                })?;
                let bytes = views[0].nbytes();
                results.push(measurement(
                    k,
                    n,
                    m,
                    kind.name(),
                    bytes,
                    act_bytes,
                    flops,
                    &times,
                    dense_median,
                ));
            }
        }
    }
    let report = KernelReport {
        cpu: cpu_model(),
        threads,
        kernel_path: path.to_string(),
        git_revision: git_revision().to_string(),
        streamed: !args.hot,
        read_bandwidth_gbps: read_bw,
        results,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report)
                .map_err(|e| Error::invalid("report", e.to_string()))?
        );
    } else {
        print_kernel_table(&report);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn measurement(
    k: usize,
    n: usize,
    m: usize,
    weights: &str,
    weight_bytes: usize,
    act_bytes: usize,
    flops: f64,
    times: &[f64],
    dense_median: f64,
) -> Measurement {
    let median = times[times.len() / 2];
    Measurement {
        k,
        n,
        m,
        weights: weights.to_string(),
        weight_bytes,
        median_s: median,
        min_s: times[0],
        max_s: times[times.len() - 1],
        gbps: (weight_bytes + act_bytes) as f64 / median / 1e9,
        gflops: flops / median / 1e9,
        speedup_vs_f32: dense_median / median,
    }
}

fn print_kernel_table(report: &KernelReport) {
    println!("hiprune bench kernels (cpu)");
    println!(
        "cpu: {} | threads: {} | path: {} | rev: {}",
        report.cpu, report.threads, report.kernel_path, report.git_revision
    );
    println!(
        "weights {} | measured read bandwidth {:.1} GB/s",
        if report.streamed {
            "streamed from memory (rotating copies)"
        } else {
            "cache-resident (--hot)"
        },
        report.read_bandwidth_gbps
    );
    let mut table = Table::new(&[
        "K x N",
        "M",
        "weights",
        "median ms",
        "min-max ms",
        "GB/s",
        "% read bw",
        "GFLOP/s",
        "vs f32",
    ]);
    for r in &report.results {
        table.row(vec![
            format!("{}x{}", r.k, r.n),
            r.m.to_string(),
            r.weights.clone(),
            format!("{:.3}", r.median_s * 1e3),
            format!("{:.3}-{:.3}", r.min_s * 1e3, r.max_s * 1e3),
            format!("{:.1}", r.gbps),
            format!("{:.0}%", 100.0 * r.gbps / report.read_bandwidth_gbps),
            format!("{:.1}", r.gflops),
            format!("{:.2}x", r.speedup_vs_f32),
        ]);
    }
    print!("{}", table.render());
}

/// Random 4-bit weights of one matrix.
struct Q4Data {
    packed: Vec<u8>,
    scales: Vec<f16>,
    offsets: Vec<f16>,
}

impl Q4Data {
    fn random(rng: &mut StdRng, kind: Q4Kind, n: usize, k: usize, group: usize) -> Self {
        let groups = n * k / group;
        Q4Data {
            packed: (0..n * k / 2).map(|_| rng.random()).collect(),
            scales: (0..groups)
                .map(|_| f16::from_f32(rng.random_range(0.001..0.01)))
                .collect(),
            offsets: if kind.has_offsets() {
                (0..groups)
                    .map(|_| f16::from_f32(rng.random_range(-0.08..0.0)))
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    fn view(&self, kind: Q4Kind, n: usize, k: usize, group: usize) -> Result<Q4Weights<'_>> {
        Q4Weights::new(kind, n, k, group, &self.packed, &self.scales, &self.offsets)
    }
}
