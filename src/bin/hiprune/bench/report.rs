//! The reports of `hiprune bench`: what each benchmark measured, as a table, CSV or
//! JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::probe::DeviceMemory;
use crate::report::{ReportHeader, Table, csv_line, human_bytes};

/// One timed (shape, M, weights) cell.
#[derive(Serialize)]
pub(crate) struct Measurement {
    pub(crate) k: usize,
    pub(crate) n: usize,
    pub(crate) m: usize,
    /// Linear layers of the model family with this shape (0: custom shape).
    pub(crate) layers_in_model: usize,
    pub(crate) weights: String,
    /// What ran: `cpu` (the CPU kernels), `cublas`, `gemv` or `gemm` (CUDA).
    pub(crate) kernel: String,
    pub(crate) weight_bytes: usize,
    /// Bytes moved once: weights + x + y.
    pub(crate) bytes_moved: usize,
    pub(crate) runs: usize,
    /// Launches timed back to back in each run (CUDA; 1 on the CPU).
    pub(crate) launches_per_run: usize,
    pub(crate) median_s: f64,
    pub(crate) min_s: f64,
    pub(crate) max_s: f64,
    pub(crate) q1_s: f64,
    pub(crate) q3_s: f64,
    pub(crate) gbps: f64,
    pub(crate) gflops: f64,
    /// `gbps` over the bandwidth measured in the same run.
    pub(crate) fraction_of_bandwidth: f64,
    /// Baseline median over this median.
    pub(crate) speedup_vs_baseline: f64,
}

#[derive(Serialize)]
pub(crate) struct KernelReport {
    pub(crate) header: ReportHeader,
    pub(crate) shapes: String,
    pub(crate) group: usize,
    pub(crate) streamed: bool,
    /// The dense baseline every row is compared with: `f32` (CPU) or `f16` (cuBLAS).
    pub(crate) baseline: String,
    /// What `bandwidth_gbps` measured.
    pub(crate) bandwidth_measure: String,
    /// The bandwidth measured in this run, GB/s.
    pub(crate) bandwidth_gbps: f64,
    /// The memory read bandwidth (CPU reports only; equals `bandwidth_gbps`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) read_bandwidth_gbps: Option<f64>,
    pub(crate) results: Vec<Measurement>,
}

/// The value at quantile `q` of sorted `times`, interpolated linearly between ranks
/// (so the median of an even count is the mean of the middle two).
pub fn quantile(times: &[f64], q: f64) -> f64 {
    match times {
        [] => f64::NAN,
        [only] => *only,
        _ => {
            let pos = (times.len() - 1) as f64 * q.clamp(0.0, 1.0);
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(times.len() - 1);
            let frac = pos - lo as f64;
            times[lo] + (times[hi] - times[lo]) * frac
        }
    }
}

pub(crate) fn kernel_table(report: &KernelReport) -> String {
    let mut out = report.header.text("hiprune bench kernels");
    out.push_str(&format!(
        "  {:<12} {} | G = {} | weights {} | baseline {}\n  {:<12} {:.1} GB/s ({})\n\n",
        "setup",
        report.shapes,
        report.group,
        if report.streamed {
            "streamed from memory (rotating copies)"
        } else {
            "cache-resident (--hot)"
        },
        report.baseline,
        "bandwidth",
        report.bandwidth_gbps,
        report.bandwidth_measure,
    ));
    let mut table = Table::new(&[
        "K x N",
        "layers",
        "M",
        "weights",
        "kernel",
        "median ms",
        "min-max ms",
        "GB/s",
        "% bw",
        "GFLOP/s",
        "vs base",
    ]);
    for r in &report.results {
        table.row(vec![
            format!("{}x{}", r.k, r.n),
            if r.layers_in_model == 0 {
                "-".to_string()
            } else {
                r.layers_in_model.to_string()
            },
            r.m.to_string(),
            r.weights.clone(),
            r.kernel.clone(),
            format!("{:.3}", r.median_s * 1e3),
            format!("{:.3}-{:.3}", r.min_s * 1e3, r.max_s * 1e3),
            format!("{:.1}", r.gbps),
            format!("{:.0}%", 100.0 * r.fraction_of_bandwidth),
            format!("{:.1}", r.gflops),
            format!("{:.2}x", r.speedup_vs_baseline),
        ]);
    }
    out.push_str(&table.render());
    out.push_str(&format!(
        "GB/s counts weights + x + y once each; % bw = GB/s over the bandwidth above; vs base = {} median / this median.\n",
        report.baseline
    ));
    out
}

pub(crate) fn kernel_csv(report: &KernelReport) -> String {
    let mut out = report.header.csv_comments();
    out.push_str(&format!(
        "# bandwidth GB/s: {:.3} ({})\n# baseline: {}\n# streamed: {}\n# group: {}\n",
        report.bandwidth_gbps,
        report.bandwidth_measure,
        report.baseline,
        report.streamed,
        report.group
    ));
    out.push_str(&csv_line(
        &[
            "k",
            "n",
            "m",
            "layers_in_model",
            "weights",
            "kernel",
            "weight_bytes",
            "bytes_moved",
            "runs",
            "launches_per_run",
            "median_s",
            "min_s",
            "max_s",
            "q1_s",
            "q3_s",
            "gbps",
            "gflops",
            "fraction_of_bandwidth",
            "speedup_vs_baseline",
        ]
        .map(String::from),
    ));
    for r in &report.results {
        out.push_str(&csv_line(&[
            r.k.to_string(),
            r.n.to_string(),
            r.m.to_string(),
            r.layers_in_model.to_string(),
            r.weights.clone(),
            r.kernel.clone(),
            r.weight_bytes.to_string(),
            r.bytes_moved.to_string(),
            r.runs.to_string(),
            r.launches_per_run.to_string(),
            format!("{:e}", r.median_s),
            format!("{:e}", r.min_s),
            format!("{:e}", r.max_s),
            format!("{:e}", r.q1_s),
            format!("{:e}", r.q3_s),
            format!("{:.4}", r.gbps),
            format!("{:.4}", r.gflops),
            format!("{:.4}", r.fraction_of_bandwidth),
            format!("{:.4}", r.speedup_vs_baseline),
        ]));
    }
    out
}

/// What one model measured (the child's JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelRun {
    /// Name in the report.
    pub label: String,
    /// The file or folder measured.
    pub source: String,
    /// Blocks of the architecture.
    pub blocks_total: usize,
    /// Blocks the model runs.
    pub blocks_run: usize,
    /// Linear layers per storage, e.g. `int4 g64: 308`.
    pub linear_formats: BTreeMap<String, usize>,
    /// Bytes of the linear weights as stored.
    pub linear_weight_bytes: u64,
    /// Bytes of the f32 copies of biases, patch convolution, positional table, norms.
    pub other_weight_bytes: u64,
    /// `linear_weight_bytes + other_weight_bytes`: the weights the model keeps resident.
    pub weight_bytes: u64,
    /// Seconds to open the model.
    pub load_s: f64,
    /// Resident set after loading and touching every weight page, before sampling.
    pub rss_before_sampling_bytes: u64,
    /// Peak resident set of the process (VmHWM).
    pub peak_rss_bytes: u64,
    /// `peak - before sampling`: activations and other scratch of the sampling loop.
    pub scratch_bytes: u64,
    /// Seconds of each denoising step.
    pub step_s: Vec<f64>,
    /// Median step.
    pub step_median_s: f64,
    /// Fastest step.
    pub step_min_s: f64,
    /// Slowest step.
    pub step_max_s: f64,
    /// Seconds of the whole sampling loop.
    pub sampling_s: f64,
    /// Threads used.
    pub threads: usize,
    /// Device memory (GPU runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_memory: Option<DeviceMemory>,
}

/// Ratios of the compressed model against the original, from one run.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// `1 - compressed / original` weight bytes.
    pub weight_bytes_reduction: f64,
    /// `1 - compressed / original` peak RSS.
    pub peak_rss_reduction: f64,
    /// `1 - compressed / original` peak device memory (allocator accounting; GPU runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_device_reduction: Option<f64>,
    /// `1 - compressed / original` median step latency.
    pub step_latency_reduction: f64,
    /// `original / compressed` median step latency.
    pub step_speedup: f64,
    /// `original / compressed` sampling time.
    pub sampling_speedup: f64,
}

#[derive(Serialize)]
pub(crate) struct Settings {
    pub(crate) source: String,
    pub(crate) resolution: usize,
    pub(crate) latent: usize,
    pub(crate) image_tokens: usize,
    pub(crate) context_tokens: usize,
    pub(crate) batch: usize,
    pub(crate) steps: usize,
    pub(crate) seed: u64,
    pub(crate) compressed: String,
    pub(crate) setup: String,
    pub(crate) notes: Vec<String>,
}

#[derive(Serialize)]
pub(crate) struct ModelReport {
    pub(crate) header: ReportHeader,
    pub(crate) settings: Settings,
    pub(crate) models: Vec<ModelRun>,
    pub(crate) comparison: Option<Comparison>,
}

pub(crate) fn compare(orig: &ModelRun, comp: &ModelRun) -> Comparison {
    let red = |a: f64, b: f64| if a > 0.0 { 1.0 - b / a } else { f64::NAN };
    Comparison {
        weight_bytes_reduction: red(orig.weight_bytes as f64, comp.weight_bytes as f64),
        peak_rss_reduction: red(orig.peak_rss_bytes as f64, comp.peak_rss_bytes as f64),
        peak_device_reduction: match (&orig.device_memory, &comp.device_memory) {
            (Some(o), Some(c)) => Some(red(o.peak_bytes as f64, c.peak_bytes as f64)),
            _ => None,
        },
        step_latency_reduction: red(orig.step_median_s, comp.step_median_s),
        step_speedup: orig.step_median_s / comp.step_median_s,
        sampling_speedup: orig.sampling_s / comp.sampling_s,
    }
}

pub(crate) fn formats_text(m: &ModelRun) -> String {
    m.linear_formats
        .iter()
        .map(|(f, n)| format!("{f} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn model_table(r: &ModelReport) -> String {
    let s = &r.settings;
    let mut out = r.header.text("hiprune bench model");
    out.push_str(&format!("  {:<12} {}\n", "model", s.source));
    if !s.setup.is_empty() {
        out.push_str(&format!("  {:<12} {}\n", "setup", s.setup));
    }
    out.push_str(&format!("  {:<12} {}\n", "compressed", s.compressed));
    out.push_str(&format!(
        "  {:<12} {res}x{res} px = {lat}x{lat} latent = {img} image tokens + {ctx} context tokens, batch {b}, {st} steps\n",
        "run",
        res = s.resolution,
        lat = s.latent,
        img = s.image_tokens,
        ctx = s.context_tokens,
        b = s.batch,
        st = s.steps
    ));
    for note in &s.notes {
        out.push_str(&format!("  {:<12} {note}\n", "note"));
    }
    out.push('\n');
    let device = r.models.iter().any(|m| m.device_memory.is_some());
    let mut columns = vec!["model", "blocks", "linear weights", "weight bytes"];
    if device {
        columns.extend(["device peak", "driver used"]);
    }
    columns.extend([
        "peak RSS",
        "scratch",
        "step median",
        "step min-max",
        "sampling",
    ]);
    let mut table = Table::new(&columns);
    for m in &r.models {
        let mut row = vec![
            m.label.clone(),
            format!("{}/{}", m.blocks_run, m.blocks_total),
            formats_text(m),
            human_bytes(m.weight_bytes),
        ];
        if device {
            let d = m.device_memory.unwrap_or_default();
            row.push(human_bytes(d.peak_bytes));
            row.push(human_bytes(d.driver_used_peak_bytes));
        }
        row.extend([
            human_bytes(m.peak_rss_bytes),
            human_bytes(m.scratch_bytes),
            format!("{:.3} s", m.step_median_s),
            format!("{:.3}-{:.3} s", m.step_min_s, m.step_max_s),
            format!("{:.2} s", m.sampling_s),
        ]);
        table.row(row);
    }
    out.push_str(&table.render());
    if device {
        out.push_str("weight bytes and scratch are on the device; peak RSS is the host process.\n");
    }
    if let Some(c) = &r.comparison {
        out.push_str(&format!(
            "reduction, compressed vs original (same run): weight bytes {:.1}%, peak RSS {:.1}%, step latency {:.1}% (step {:.2}x, sampling {:.2}x as fast)\n",
            100.0 * c.weight_bytes_reduction,
            100.0 * c.peak_rss_reduction,
            100.0 * c.step_latency_reduction,
            c.step_speedup,
            c.sampling_speedup
        ));
        if let Some(d) = c.peak_device_reduction {
            out.push_str(&format!(
                "reduction of peak device memory (allocator accounting): {:.1}%\n",
                100.0 * d
            ));
        }
    }
    out
}

pub(crate) fn model_csv(r: &ModelReport) -> String {
    let s = &r.settings;
    let mut out = r.header.csv_comments();
    out.push_str(&format!(
        "# model: {}\n# compressed: {}\n# resolution: {}\n# context tokens: {}\n# steps: {}\n",
        s.source, s.compressed, s.resolution, s.context_tokens, s.steps
    ));
    for note in &s.notes {
        out.push_str(&format!("# note: {note}\n"));
    }
    out.push_str(&csv_line(
        &[
            "label",
            "blocks_run",
            "blocks_total",
            "linear_formats",
            "weight_bytes",
            "peak_rss_bytes",
            "scratch_bytes",
            "step_median_s",
            "step_min_s",
            "step_max_s",
            "sampling_s",
            "device_weights_bytes",
            "device_scratch_peak_bytes",
            "device_peak_bytes",
            "driver_used_peak_bytes",
        ]
        .map(String::from),
    ));
    for m in &r.models {
        out.push_str(&csv_line(
            &[
                m.label.clone(),
                m.blocks_run.to_string(),
                m.blocks_total.to_string(),
                formats_text(m),
                m.weight_bytes.to_string(),
                m.peak_rss_bytes.to_string(),
                m.scratch_bytes.to_string(),
                format!("{:e}", m.step_median_s),
                format!("{:e}", m.step_min_s),
                format!("{:e}", m.step_max_s),
                format!("{:e}", m.sampling_s),
            ]
            .into_iter()
            .chain(
                [
                    m.device_memory.map(|d| d.weights_bytes),
                    m.device_memory.map(|d| d.scratch_peak_bytes),
                    m.device_memory.map(|d| d.peak_bytes),
                    m.device_memory.map(|d| d.driver_used_peak_bytes),
                ]
                .map(|v| v.map(|b| b.to_string()).unwrap_or_default()),
            )
            .collect::<Vec<_>>(),
        ));
    }
    out
}
