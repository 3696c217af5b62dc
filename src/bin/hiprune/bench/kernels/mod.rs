//! `hiprune bench kernels`: the 4-bit linear kernels against the dense baseline on
//! every linear shape of an SD3.5 model family, measured in one run (on CUDA in
//! [`cuda`]).

use std::collections::BTreeMap;
use std::time::Instant;

use clap::Args;
use half::f16;
use hiprune::backend::cpu::{KernelPath, int8, linear, membw};
use hiprune::model::layout::{Required, required_tensors};
use hiprune::model::{MmditConfig, PruneSpec};
use hiprune::quant::{DenseData, LinearWeights};
use hiprune::quant::{Q4Kind, Q4Weights};
use hiprune::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::probe::{backend_name, check_backend, gpu_info};
use super::report::{KernelReport, Measurement, kernel_csv, kernel_table, quantile};
use crate::forward::BackendChoice;
use crate::report::{OutputFormat, ReportHeader};

#[cfg(feature = "cuda")]
mod cuda;

/// Options of `hiprune bench kernels`.
#[derive(Args)]
pub struct KernelArgs {
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    pub(crate) backend: BackendChoice,
    /// Shapes: `sd35-large`, `sd35-medium` (every linear shape of the model family) or
    /// `K,N;K,N;...`.
    #[arg(long, default_value = "sd35-large")]
    pub(crate) shapes: String,
    /// Rows of x (tokens), comma-separated.
    #[arg(long, default_value = "1,256")]
    pub(crate) m: String,
    /// Weights to compare with the dense baseline: `int4` (symmetric, scale only),
    /// `int4-asym` (scale and offset), `nf4`, `f16` (dense f16 weights; on CUDA that is
    /// the cuBLAS baseline, always measured) and `int4-a8` (INT4 weights, per-token int8
    /// activations; CPU only). Activations are f32 on the CPU, f16 on CUDA.
    #[arg(long, default_value = "int4,nf4")]
    pub(crate) weights: String,
    /// Group (block) size of the 4-bit weights.
    #[arg(long, default_value_t = 64)]
    pub(crate) group: usize,
    /// Threads (default: all cores, or RAYON_NUM_THREADS).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Keep one copy of each weight matrix (cache-resident) instead of rotating over
    /// enough copies to stream weights from memory.
    #[arg(long)]
    pub(crate) hot: bool,
    /// Time budget per measurement, seconds (after one warm-up run; at least 3 and at
    /// most 200 timed runs).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) seconds: f64,
    /// Print JSON instead of a table.
    #[arg(long, conflicts_with = "csv")]
    pub(crate) json: bool,
    /// Print CSV instead of a table.
    #[arg(long)]
    pub(crate) csv: bool,
}

/// Copies of the weights to rotate over when streaming: together they exceed any L3.
const STREAM_BYTES: usize = 96 << 20;

/// One linear shape and how many layers of the model family have it (0 for a custom
/// shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) k: usize,
    pub(crate) n: usize,
    pub(crate) layers: usize,
}

/// Every distinct linear shape (K, N) of `cfg`'s unpruned model, in model order, with
/// the number of layers of each.
fn family_shapes(cfg: &MmditConfig) -> Vec<Shape> {
    let mut order: Vec<(usize, usize)> = Vec::new();
    let mut counts: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for req in required_tensors(cfg, &PruneSpec::none()) {
        if let Required::Linear { n, k, .. } = req {
            let c = counts.entry((k, n)).or_insert(0);
            if *c == 0 {
                order.push((k, n));
            }
            *c += 1;
        }
    }
    order
        .into_iter()
        .map(|(k, n)| Shape {
            k,
            n,
            layers: counts.get(&(k, n)).copied().unwrap_or(0),
        })
        .collect()
}

/// `sd35-large`, `sd35-medium` or `K,N;K,N;...` (duplicates dropped).
fn parse_shapes(spec: &str) -> Result<Vec<Shape>> {
    match spec.trim() {
        "sd35-large" => return Ok(family_shapes(&MmditConfig::sd35_large())),
        "sd35-medium" => return Ok(family_shapes(&MmditConfig::sd35_medium())),
        _ => {}
    }
    let mut out: Vec<Shape> = Vec::new();
    for pair in spec.split(';').filter(|s| !s.trim().is_empty()) {
        let dims: Vec<&str> = pair.split(',').map(str::trim).collect();
        let shape = match dims.as_slice() {
            [k, n] => match (k.parse::<usize>(), n.parse::<usize>()) {
                (Ok(k), Ok(n)) if k > 0 && n > 0 => Shape { k, n, layers: 0 },
                _ => {
                    return Err(Error::invalid(
                        "--shapes",
                        format!("`{pair}` is not K,N with positive integers"),
                    ));
                }
            },
            _ => {
                return Err(Error::invalid(
                    "--shapes",
                    format!(
                        "`{pair}` is not a shape name or K,N; use sd35-large, sd35-medium or K,N;K,N"
                    ),
                ));
            }
        };
        if !out.contains(&shape) {
            out.push(shape);
        }
    }
    if out.is_empty() {
        return Err(Error::invalid(
            "--shapes",
            "no shape given; use sd35-large, sd35-medium or K,N;K,N",
        ));
    }
    Ok(out)
}

/// A comma-separated list of positive integers (duplicates dropped).
pub fn parse_list(flag: &str, spec: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for s in spec.split(',') {
        match s.trim().parse::<usize>() {
            Ok(v) if v > 0 => {
                if !out.contains(&v) {
                    out.push(v);
                }
            }
            _ => {
                return Err(Error::invalid(
                    flag,
                    format!("`{}` is not a positive integer", s.trim()),
                ));
            }
        }
    }
    Ok(out)
}

/// A kernel variant to compare with the dense f32 baseline.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// f32 activations, INT4 or NF4 weights.
    Q4(Q4Kind),
    /// INT4 weights with per-token int8 activations (integer dot products).
    Int4Int8Activations,
    /// Dense f16 weights, f32 activations.
    F16,
}

impl Variant {
    fn q4_kind(self) -> Option<Q4Kind> {
        match self {
            Variant::Q4(kind) => Some(kind),
            Variant::Int4Int8Activations => Some(Q4Kind::Int4),
            Variant::F16 => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Q4(kind) => kind.name(),
            Variant::Int4Int8Activations => "int4-a8",
            Variant::F16 => "f16",
        }
    }
}

fn parse_variants(spec: &str) -> Result<Vec<Variant>> {
    let mut out = Vec::new();
    for s in spec.split(',') {
        let v = match s.trim() {
            "int4" | "int4sym" => Variant::Q4(Q4Kind::Int4Sym),
            "int4-asym" => Variant::Q4(Q4Kind::Int4),
            "nf4" => Variant::Q4(Q4Kind::Nf4),
            "int4-a8" => Variant::Int4Int8Activations,
            "f16" => Variant::F16,
            other => {
                return Err(Error::invalid(
                    "--weights",
                    format!("`{other}` is not one of int4, int4-asym, nf4, f16, int4-a8"),
                ));
            }
        };
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

/// Runs `f` once as warm-up, then until the time budget is spent (at least 3, at most
/// 200 runs), and returns the sorted run times.
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

pub fn run(args: &KernelArgs) -> Result<()> {
    check_backend(args.backend)?;
    let shapes = parse_shapes(&args.shapes)?;
    let ms = parse_list("--m", &args.m)?;
    let variants = parse_variants(&args.weights)?;
    if !(args.seconds.is_finite() && args.seconds >= 0.0) {
        return Err(Error::invalid("--seconds", "must be a non-negative number"));
    }
    for shape in &shapes {
        for v in &variants {
            if let Some(kind) = v.q4_kind() {
                hiprune::quant::check_q4_dims(
                    kind,
                    &format!("--shapes {},{}", shape.k, shape.n),
                    shape.k,
                    args.group,
                )?;
            }
        }
    }
    let threads = args.threads.unwrap_or_else(rayon::current_num_threads);
    if threads == 0 {
        return Err(Error::invalid("--threads", "must be at least 1"));
    }
    let header = ReportHeader::collect(backend_name(args.backend), threads, gpu_info(args.backend));
    let (results, read_bw) = match args.backend {
        BackendChoice::Cpu => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| Error::invalid("--threads", e.to_string()))?;
            pool.install(|| kernels_cpu(args, &shapes, &ms, &variants, threads))?
        }
        #[cfg(feature = "cuda")]
        BackendChoice::Cuda => cuda::kernels(args, &shapes, &ms, &variants)?,
        #[cfg(not(feature = "cuda"))]
        BackendChoice::Cuda => {
            check_backend(args.backend)?;
            return Ok(());
        }
    };
    let cpu = matches!(args.backend, BackendChoice::Cpu);
    let report = KernelReport {
        header,
        shapes: args.shapes.clone(),
        group: args.group,
        streamed: !args.hot,
        baseline: if cpu { "f32" } else { "f16 (cuBLAS)" }.to_string(),
        bandwidth_measure: if cpu {
            "memory read bandwidth (all threads)"
        } else {
            "device-to-device copy, read + written bytes"
        }
        .to_string(),
        bandwidth_gbps: read_bw,
        read_bandwidth_gbps: cpu.then_some(read_bw),
        results,
    };
    match OutputFormat::from_flags(args.json, args.csv) {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report)
                .map_err(|e| Error::invalid("report", e.to_string()))?
        ),
        OutputFormat::Csv => print!("{}", kernel_csv(&report)),
        OutputFormat::Table => print!("{}", kernel_table(&report)),
    }
    Ok(())
}

/// Random weights of one shape in every form the run needs.
struct ShapeWeights {
    dense: Vec<Vec<f32>>,
    f16: Vec<Vec<f16>>,
    q4: Vec<(Variant, Vec<Q4Data>)>,
}

fn kernels_cpu(
    args: &KernelArgs,
    shapes: &[Shape],
    ms: &[usize],
    variants: &[Variant],
    threads: usize,
) -> Result<(Vec<Measurement>, f64)> {
    eprintln!("measuring memory read bandwidth ...");
    let read_bw = membw::measure_read_bandwidth(256 << 20, threads);
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut results = Vec::new();
    let total = shapes.len() * ms.len();
    let copies = |bytes: usize| {
        if args.hot {
            1
        } else {
            STREAM_BYTES.div_ceil(bytes.max(1)).max(1)
        }
    };
    for (i, shape) in shapes.iter().enumerate() {
        let (k, n) = (shape.k, shape.n);
        let nk = n
            .checked_mul(k)
            .ok_or_else(|| Error::invalid("--shapes", format!("{k},{n} overflows")))?;
        let dense: Vec<Vec<f32>> = (0..copies(nk * 4))
            .map(|_| (0..nk).map(|_| rng.random_range(-0.05f32..0.05)).collect())
            .collect();
        let f16: Vec<Vec<f16>> = if variants.contains(&Variant::F16) {
            (0..copies(nk * 2))
                .map(|c| {
                    dense[c % dense.len()]
                        .iter()
                        .map(|&v| f16::from_f32(v))
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        };
        let q4 = variants
            .iter()
            .filter_map(|&v| v.q4_kind().map(|kind| (v, kind)))
            .map(|(v, kind)| {
                let bytes = nk / 2 + nk / args.group * 4;
                (
                    v,
                    (0..copies(bytes))
                        .map(|_| Q4Data::random(&mut rng, kind, n, k, args.group))
                        .collect(),
                )
            })
            .collect();
        let weights = ShapeWeights { dense, f16, q4 };
        for (j, &m) in ms.iter().enumerate() {
            eprintln!("[{}/{total}] K={k} N={n} M={m}", i * ms.len() + j + 1);
            measure_shape(
                args,
                *shape,
                m,
                variants,
                &weights,
                read_bw,
                &mut rng,
                &mut results,
            )?;
        }
    }
    Ok((results, read_bw))
}

#[allow(clippy::too_many_arguments)]
fn measure_shape(
    args: &KernelArgs,
    shape: Shape,
    m: usize,
    variants: &[Variant],
    w: &ShapeWeights,
    read_bw: f64,
    rng: &mut StdRng,
    results: &mut Vec<Measurement>,
) -> Result<()> {
    let (k, n) = (shape.k, shape.n);
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut y = vec![0.0f32; m * n];
    let cell = Cell {
        shape,
        m,
        act_bytes: 4 * (m * k + m * n),
        flops: 2.0 * (m as f64) * (n as f64) * (k as f64),
        read_bw,
    };
    let dense_times = time_runs(args.seconds, |run| {
        let lw = LinearWeights::dense(DenseData::F32(&w.dense[run % w.dense.len()]), n, k)?;
        linear(&x, m, &lw, None, &mut y)
    })?;
    let dense_median = quantile(&dense_times, 0.5);
    results.push(cell.measurement("f32", "cpu", n * k * 4, &dense_times, 1, dense_median));
    for &v in variants {
        let (times, bytes) = match v {
            Variant::F16 => {
                let times = time_runs(args.seconds, |run| {
                    let lw = LinearWeights::dense(DenseData::F16(&w.f16[run % w.f16.len()]), n, k)?;
                    linear(&x, m, &lw, None, &mut y)
                })?;
                (times, n * k * 2)
            }
            _ => {
                let Some((_, copies)) = w.q4.iter().find(|(q, _)| *q == v) else {
                    continue;
                };
                let Some(kind) = v.q4_kind() else { continue };
                let views = copies
                    .iter()
                    .map(|d| d.view(kind, n, k, args.group))
                    .collect::<Result<Vec<_>>>()?;
                let times = time_runs(args.seconds, |run| {
                    let qw = views[run % views.len()];
                    match v {
                        Variant::Int4Int8Activations => {
                            int8::linear_q4_int8(KernelPath::detect(), &x, m, &qw, None, &mut y)
                        }
                        _ => linear(&x, m, &LinearWeights::Q4(qw), None, &mut y),
                    }
                })?;
                (times, views[0].nbytes())
            }
        };
        results.push(cell.measurement(v.name(), "cpu", bytes, &times, 1, dense_median));
    }
    Ok(())
}

/// The fixed quantities of one (shape, M) cell.
struct Cell {
    shape: Shape,
    m: usize,
    act_bytes: usize,
    flops: f64,
    read_bw: f64,
}

impl Cell {
    /// The row of `weights` run by `kernel` from its sorted per-launch `times`
    /// (`batch` launches per timed run), against the baseline's median.
    fn measurement(
        &self,
        weights: &str,
        kernel: &str,
        weight_bytes: usize,
        times: &[f64],
        batch: usize,
        baseline_median: f64,
    ) -> Measurement {
        let median = quantile(times, 0.5);
        let bytes_moved = weight_bytes + self.act_bytes;
        let gbps = bytes_moved as f64 / median / 1e9;
        Measurement {
            k: self.shape.k,
            n: self.shape.n,
            m: self.m,
            layers_in_model: self.shape.layers,
            weights: weights.to_string(),
            kernel: kernel.to_string(),
            weight_bytes,
            bytes_moved,
            runs: times.len(),
            launches_per_run: batch,
            median_s: median,
            min_s: times.first().copied().unwrap_or(f64::NAN),
            max_s: times.last().copied().unwrap_or(f64::NAN),
            q1_s: quantile(times, 0.25),
            q3_s: quantile(times, 0.75),
            gbps,
            gflops: self.flops / median / 1e9,
            fraction_of_bandwidth: gbps / self.read_bw,
            speedup_vs_baseline: baseline_median / median,
        }
    }
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
