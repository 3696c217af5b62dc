//! `hiprune bench model`: per-step latency, end-to-end sampling time and memory of a
//! whole model, the dense original and the compressed model side by side.
//!
//! Each model is measured in a child process (this binary re-run with the hidden
//! `bench model-run` subcommand, which prints one JSON object on stdout), so the peak
//! resident set reported for a model is that model's alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Args;
use hiprune::backend::Backend;
use hiprune::compress::quantize::{CompressOptions, WeightFormat};
use hiprune::compress::{
    GenerateOptions, PlanOptions, PlanTarget, Preset, compress_checkpoint, generate_checkpoint,
    make_plan,
};
use hiprune::format::Package;
use hiprune::model::layout::{Required, required_tensors};
use hiprune::model::sampler::{Conditioning, initial_latent};
use hiprune::model::{Mmdit, MmditConfig, PruneSpec, SampleOptions, Tensor, WeightBytes, sample};
use hiprune::quant::{DenseData, LinearWeights};
use hiprune::{Error, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::bench::{backend_name, check_backend, gpu_info, quantile};
use crate::forward::BackendChoice;
use crate::report::{OutputFormat, ReportHeader, Table, csv_line, human_bytes};

/// Most context tokens accepted (SD3 uses 77 CLIP + 256 T5 = 333).
pub const MAX_CONTEXT_TOKENS: usize = 8192;

/// Options of `hiprune bench model`.
#[derive(Args)]
pub struct ModelArgs {
    /// A compressed .hpk package or a diffusers transformer folder.
    #[arg(required_unless_present = "generate", conflicts_with = "generate")]
    model: Option<PathBuf>,
    /// Measure a model of seeded random weights of these shapes instead of a file:
    /// `sd35-large`, `sd35-medium` or `tiny`. Nothing is downloaded; the weights live in
    /// a temporary folder removed afterwards.
    #[arg(long)]
    generate: Option<String>,
    /// Blocks the compressed model removes (original indices, comma-separated).
    #[arg(long, conflicts_with = "preset")]
    remove_blocks: Option<String>,
    /// A published cut for the compressed model: `sd35-large-turbo` or `sd35-medium`
    /// (default: the cut matching the architecture, if any).
    #[arg(long)]
    preset: Option<String>,
    /// Linear weights of the compressed model: `int4` (symmetric), `int4-asym`, `nf4` or
    /// `f16`.
    #[arg(long, default_value = "int4")]
    weights: String,
    /// Group (block) size of the 4-bit weights.
    #[arg(long, default_value_t = 64)]
    group: usize,
    /// Image side in pixels (default: the model's native size, 1024 for SD3.5).
    #[arg(long)]
    resolution: Option<usize>,
    /// Prompt tokens (SD3: 77 CLIP + 256 T5).
    #[arg(long, default_value_t = 333)]
    context_tokens: usize,
    /// Denoising steps.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendChoice,
    /// Threads (default: all cores, or RAYON_NUM_THREADS).
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the generated weights, the prompt embeddings and the start latent.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON instead of a table.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print CSV instead of a table.
    #[arg(long)]
    csv: bool,
}

/// Options of the hidden `hiprune bench model-run`.
#[derive(Args)]
pub struct ModelRunArgs {
    /// A diffusers transformer folder or an .hpk package.
    model: PathBuf,
    /// Name of the model in the report.
    #[arg(long)]
    label: String,
    /// Image side in pixels.
    #[arg(long)]
    resolution: usize,
    /// Prompt tokens.
    #[arg(long)]
    context_tokens: usize,
    /// Denoising steps.
    #[arg(long)]
    steps: usize,
    /// Seed of the prompt embeddings and the start latent.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendChoice,
}

/// Device memory of one model run on a GPU: the allocator's accounting (bytes the
/// backend asked for) and the driver's free-memory reading (all processes, with the
/// driver's rounding and the context's own memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMemory {
    /// Weight bytes on the device after loading.
    pub weights_bytes: u64,
    /// Peak bytes of activations and temporaries.
    pub scratch_peak_bytes: u64,
    /// Peak of weights + scratch together.
    pub peak_bytes: u64,
    /// Free device memory before loading.
    pub driver_free_before_bytes: u64,
    /// Free device memory after loading.
    pub driver_free_after_load_bytes: u64,
    /// Lowest free device memory seen after a step.
    pub driver_free_min_bytes: u64,
    /// `free before - lowest free`: what the run took from the device at its peak.
    pub driver_used_peak_bytes: u64,
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
struct Settings {
    source: String,
    resolution: usize,
    latent: usize,
    image_tokens: usize,
    context_tokens: usize,
    batch: usize,
    steps: usize,
    seed: u64,
    compressed: String,
    setup: String,
    notes: Vec<String>,
}

#[derive(Serialize)]
struct ModelReport {
    header: ReportHeader,
    settings: Settings,
    models: Vec<ModelRun>,
    comparison: Option<Comparison>,
}

/// The latent side for `resolution` pixels, or why `cfg` cannot run it.
pub fn latent_side(cfg: &MmditConfig, resolution: usize) -> Result<usize> {
    let p = cfg.patch_size;
    let unit = 8 * p;
    if resolution == 0 || !resolution.is_multiple_of(unit) {
        return Err(Error::invalid(
            "--resolution",
            format!("{resolution} is not a positive multiple of {unit} (8 x the patch size {p})"),
        ));
    }
    let grid = resolution / unit;
    let max = cfg.pos_embed_max_size;
    if grid > max {
        return Err(Error::invalid(
            "--resolution",
            format!(
                "{resolution} px needs a {grid}x{grid} patch grid, beyond the {max}x{max} positional table (at most {} px)",
                max * unit
            ),
        ));
    }
    Ok(resolution / 8)
}

fn weight_format(name: &str) -> Result<WeightFormat> {
    match name {
        "int4" => Ok(WeightFormat::Int4),
        "int4-asym" => Ok(WeightFormat::Int4Asym),
        "nf4" => Ok(WeightFormat::Nf4),
        "f16" => Ok(WeightFormat::F16),
        other => Err(Error::invalid(
            "--weights",
            format!("`{other}` is not one of int4, int4-asym, nf4, f16"),
        )),
    }
}

/// The compression settings for `cfg`: the preset's cut, the listed blocks, or the cut
/// matching the architecture (none if there is none).
fn compress_options(cfg: &MmditConfig, args: &ModelArgs) -> Result<(CompressOptions, String)> {
    let weights = weight_format(&args.weights)?;
    let target = match (&args.preset, &args.remove_blocks) {
        (Some(p), _) => PlanTarget::Preset(p.clone()),
        (None, Some(list)) => PlanTarget::Remove(PruneSpec::parse_block_list(list)?),
        (None, None) => match cfg.num_layers {
            38 => PlanTarget::Preset("sd35-large-turbo".into()),
            24 => PlanTarget::Preset("sd35-medium".into()),
            _ => PlanTarget::None,
        },
    };
    let plan = make_plan(
        cfg,
        None,
        &PlanOptions {
            target,
            weights,
            group: args.group,
            ..PlanOptions::default()
        },
    )?;
    let base = CompressOptions {
        weights,
        group: args.group,
        ..CompressOptions::default()
    };
    let group = if weights.q4_kind().is_some() {
        format!(" g{}", args.group)
    } else {
        String::new()
    };
    let what = format!(
        "{weights}{group}, {} of {} blocks (removed {:?})",
        plan.kept_blocks.len(),
        plan.num_layers,
        plan.removed_blocks
    );
    Ok((plan.compress_options(base), what))
}

/// A model to measure: its label and where it is.
struct Target {
    label: String,
    path: PathBuf,
}

/// Checks `--steps` and `--context-tokens` (the parent before generating anything, the
/// child again because it can be run on its own).
fn check_run_sizes(steps: usize, context_tokens: usize) -> Result<()> {
    if steps == 0 {
        return Err(Error::invalid("--steps", "must be at least 1"));
    }
    if context_tokens == 0 || context_tokens > MAX_CONTEXT_TOKENS {
        return Err(Error::invalid(
            "--context-tokens",
            format!("{context_tokens} is outside 1..={MAX_CONTEXT_TOKENS}"),
        ));
    }
    Ok(())
}

/// Runs `hiprune bench model`.
pub fn run(args: &ModelArgs) -> Result<()> {
    check_backend(args.backend)?;
    #[cfg(feature = "cuda")]
    if let BackendChoice::Cuda = args.backend {
        // Before generating or compressing anything: fail fast without a usable device.
        // The handle is dropped at once; each child opens its own.
        hiprune::backend::cuda::CudaDevice::new(0)?;
    }
    check_run_sizes(args.steps, args.context_tokens)?;
    if args.threads == Some(0) {
        return Err(Error::invalid("--threads", "must be at least 1"));
    }
    weight_format(&args.weights)?;
    let threads = args.threads.unwrap_or_else(rayon::current_num_threads);
    let header = ReportHeader::collect(backend_name(args.backend), threads, gpu_info(args.backend));

    let mut notes = vec![
        "each model runs in its own child process, so its peak RSS is its own".to_string(),
        "weight pages are touched before sampling; step times exclude loading".to_string(),
    ];
    if let BackendChoice::Cuda = args.backend {
        notes.push(
            "device memory: weights, scratch and peak from the allocator's accounting; \
             driver used = free before loading - lowest free after a step"
                .to_string(),
        );
        notes.push(
            "step times are wall-clock; each step ends with its output copied to the host"
                .to_string(),
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("hiprune-bench-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let (source, cfg, targets, compressed, setup) = match (&args.generate, &args.model) {
        (Some(name), _) => {
            let preset = Preset::parse(name).map_err(|_| {
                Error::invalid(
                    "--generate",
                    format!("`{name}` is not one of sd35-large, sd35-medium, tiny"),
                )
            })?;
            let cfg = preset.config();
            let resolution = args.resolution.unwrap_or(cfg.sample_size * 8);
            latent_side(&cfg, resolution)?;
            let (opts, what) = compress_options(&cfg, args)?;
            let ckpt = tmp.path().join("checkpoint");
            eprintln!("generating seeded {name} weights (f16) ...");
            let t = Instant::now();
            generate_checkpoint(
                &ckpt,
                &GenerateOptions {
                    seed: args.seed,
                    ..GenerateOptions::new(cfg.clone())
                },
            )?;
            let gen_s = t.elapsed().as_secs_f64();
            let (hpk, comp_s) = compress_into(&ckpt, tmp.path(), &opts)?;
            let targets = vec![
                Target {
                    label: "dense f16".into(),
                    path: ckpt,
                },
                Target {
                    label: "compressed".into(),
                    path: hpk,
                },
            ];
            let setup = format!(
                "generated in {gen_s:.1} s (seed {}), compressed in {comp_s:.1} s",
                args.seed
            );
            (format!("--generate {name}"), cfg, targets, what, setup)
        }
        (None, Some(path)) if path.is_dir() => {
            let cfg = MmditConfig::from_file(path.join("config.json"))?;
            let resolution = args.resolution.unwrap_or(cfg.sample_size * 8);
            latent_side(&cfg, resolution)?;
            let (opts, what) = compress_options(&cfg, args)?;
            let (hpk, comp_s) = compress_into(path, tmp.path(), &opts)?;
            let targets = vec![
                Target {
                    label: "original".into(),
                    path: path.clone(),
                },
                Target {
                    label: "compressed".into(),
                    path: hpk,
                },
            ];
            let setup = format!("compressed in {comp_s:.1} s into a temporary package");
            (path.display().to_string(), cfg, targets, what, setup)
        }
        (None, Some(path)) => {
            if args.preset.is_some() || args.remove_blocks.is_some() {
                return Err(Error::invalid(
                    "--preset/--remove-blocks",
                    "apply to a diffusers folder or --generate; a package is measured as it is",
                ));
            }
            let package = Package::open(path)?;
            let manifest = package.manifest();
            let cfg = manifest.architecture.clone().ok_or_else(|| {
                Error::invalid(
                    format!("package {}", path.display()),
                    "holds no model architecture",
                )
            })?;
            let resolution = args.resolution.unwrap_or(cfg.sample_size * 8);
            latent_side(&cfg, resolution)?;
            let kept = if manifest.kept_blocks.is_empty() {
                cfg.num_layers
            } else {
                manifest.kept_blocks.len()
            };
            let what = format!("the package as stored, {kept} of {} blocks", cfg.num_layers);
            let mut targets = Vec::new();
            match original_of(path, &manifest.provenance.source, manifest.provenance.source_bytes)
            {
                Some(orig) => targets.push(Target {
                    label: "original".into(),
                    path: orig,
                }),
                None => notes.push(format!(
                    "uncompressed original not available: the provenance names `{}` ({} bytes), not found next to the package",
                    manifest.provenance.source, manifest.provenance.source_bytes
                )),
            }
            drop(package);
            targets.push(Target {
                label: "compressed".into(),
                path: path.clone(),
            });
            (
                path.display().to_string(),
                cfg,
                targets,
                what,
                String::new(),
            )
        }
        (None, None) => {
            return Err(Error::invalid(
                "bench model",
                "give a model (.hpk or diffusers folder) or --generate",
            ));
        }
    };
    let resolution = args.resolution.unwrap_or(cfg.sample_size * 8);
    let latent = latent_side(&cfg, resolution)?;
    let grid = latent / cfg.patch_size;

    let mut models = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        eprintln!(
            "[{}/{}] measuring {} ({}) in a child process ...",
            i + 1,
            targets.len(),
            target.label,
            target.path.display()
        );
        models.push(measure_in_child(target, args, resolution)?);
    }
    drop(tmp);

    let comparison = match models.as_slice() {
        [orig, comp] => Some(compare(orig, comp)),
        _ => None,
    };
    let report = ModelReport {
        header,
        settings: Settings {
            source,
            resolution,
            latent,
            image_tokens: grid * grid,
            context_tokens: args.context_tokens,
            batch: 1,
            steps: args.steps,
            seed: args.seed,
            compressed,
            setup,
            notes,
        },
        models,
        comparison,
    };
    match OutputFormat::from_flags(args.json, args.csv) {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report)
                .map_err(|e| Error::invalid("report", e.to_string()))?
        ),
        OutputFormat::Csv => print!("{}", model_csv(&report)),
        OutputFormat::Table => print!("{}", model_table(&report)),
    }
    Ok(())
}

/// Device memory readings around one model run (GPU backends); the CPU has none.
trait MemoryProbe {
    /// Called right before the model is loaded.
    fn before_load(&mut self) -> Result<()>;
    /// Called right after the model is loaded.
    fn after_load(&mut self) -> Result<()>;
    /// Called after each denoising step.
    fn after_step(&mut self);
    /// The figures of the run.
    fn finish(&self) -> Option<DeviceMemory>;
}

/// The CPU's [`MemoryProbe`]: nothing to read.
struct NoDeviceMemory;

impl MemoryProbe for NoDeviceMemory {
    fn before_load(&mut self) -> Result<()> {
        Ok(())
    }
    fn after_load(&mut self) -> Result<()> {
        Ok(())
    }
    fn after_step(&mut self) {}
    fn finish(&self) -> Option<DeviceMemory> {
        None
    }
}

/// The [`MemoryProbe`] of a CUDA device: the handle's memory ledger and the driver's
/// free memory. It must read the same `CudaDevice` handle (or a clone) the backend
/// allocates through, or the ledger stays empty.
#[cfg(feature = "cuda")]
struct CudaMemoryProbe {
    device: hiprune::backend::cuda::CudaDevice,
    free_before: u64,
    free_after_load: u64,
    free_min: u64,
    weights: u64,
}

#[cfg(feature = "cuda")]
impl CudaMemoryProbe {
    fn new(device: &hiprune::backend::cuda::CudaDevice) -> Result<Self> {
        let free = device.free_memory()?;
        Ok(CudaMemoryProbe {
            device: device.clone(),
            free_before: free,
            free_after_load: free,
            free_min: free,
            weights: 0,
        })
    }
}

#[cfg(feature = "cuda")]
impl MemoryProbe for CudaMemoryProbe {
    fn before_load(&mut self) -> Result<()> {
        self.free_before = self.device.free_memory()?;
        self.free_min = self.free_before;
        Ok(())
    }
    fn after_load(&mut self) -> Result<()> {
        self.device.synchronize()?;
        self.free_after_load = self.device.free_memory()?;
        self.free_min = self.free_min.min(self.free_after_load);
        self.weights = self.device.memory().weights.current;
        Ok(())
    }
    fn after_step(&mut self) {
        // A failed reading only loses one sample; the step itself reports errors.
        if let Ok(free) = self.device.free_memory() {
            self.free_min = self.free_min.min(free);
        }
    }
    fn finish(&self) -> Option<DeviceMemory> {
        let m = self.device.memory();
        Some(DeviceMemory {
            weights_bytes: self.weights,
            scratch_peak_bytes: m.scratch.peak,
            peak_bytes: m.total.peak,
            driver_free_before_bytes: self.free_before,
            driver_free_after_load_bytes: self.free_after_load,
            driver_free_min_bytes: self.free_min,
            driver_used_peak_bytes: self.free_before.saturating_sub(self.free_min),
        })
    }
}

/// Measures one model on CUDA device 0 (the child of `bench model --backend cuda`).
#[cfg(feature = "cuda")]
fn measure_model_cuda(args: &ModelRunArgs, threads: usize) -> Result<ModelRun> {
    let device = hiprune::backend::cuda::CudaDevice::new(0)?;
    let mut probe = CudaMemoryProbe::new(&device)?;
    // The backend allocates through the probe's device handle, so the probe's ledger
    // counts the model's weights and scratch.
    let backend = hiprune::backend::cuda::CudaBackend::from_device(device);
    measure_model(args, threads, |p| Mmdit::load_with(p, backend), &mut probe)
}

/// Compresses `source` into `dir/model.hpk`; returns the path and the seconds taken.
fn compress_into(source: &Path, dir: &Path, opts: &CompressOptions) -> Result<(PathBuf, f64)> {
    let out = dir.join("model.hpk");
    eprintln!("compressing ...");
    let t = Instant::now();
    let mut last = 0u64;
    compress_checkpoint(source, &out, opts, &mut |p| {
        let pct = (100 * p.done).checked_div(p.total).unwrap_or(100);
        if pct >= last + 10 {
            last = pct;
            eprintln!("  compress {pct}%");
        }
    })?;
    Ok((out, t.elapsed().as_secs_f64()))
}

/// The uncompressed original a package names in its provenance, when it sits next to
/// the package (or in the working directory) with the recorded size.
fn original_of(package: &Path, source: &str, bytes: u64) -> Option<PathBuf> {
    if source.is_empty() {
        return None;
    }
    let mut candidates = Vec::new();
    if let Some(dir) = package.parent() {
        candidates.push(dir.join(source));
    }
    candidates.push(PathBuf::from(source));
    candidates.into_iter().find(|c| {
        c.join("config.json").is_file()
            && hiprune::compress::quantize::checkpoint_bytes(c).is_ok_and(|b| b == bytes)
    })
}

/// Runs `bench model-run` for `target` in a child process and parses its JSON.
fn measure_in_child(target: &Target, args: &ModelArgs, resolution: usize) -> Result<ModelRun> {
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("bench")
        .arg("model-run")
        .arg(&target.path)
        .args(["--label", &target.label])
        .args(["--resolution", &resolution.to_string()])
        .args(["--context-tokens", &args.context_tokens.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--seed", &args.seed.to_string()])
        .args(["--backend", backend_name(args.backend)]);
    if let Some(t) = args.threads {
        cmd.args(["--threads", &t.to_string()]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Error::io(&exe, e))?;
    if !out.status.success() {
        return Err(Error::invalid(
            format!("measuring `{}`", target.label),
            format!(
                "the child process failed ({}); see its error above",
                out.status
            ),
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        Error::invalid(
            format!("measuring `{}`", target.label),
            format!("the child process printed no valid report: {e}"),
        )
    })
}

fn compare(orig: &ModelRun, comp: &ModelRun) -> Comparison {
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

fn formats_text(m: &ModelRun) -> String {
    m.linear_formats
        .iter()
        .map(|(f, n)| format!("{f} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn model_table(r: &ModelReport) -> String {
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

fn model_csv(r: &ModelReport) -> String {
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

/// A `/proc/self/status` field in bytes (0 where unreadable).
fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Reads one value per 4 KiB page of `bytes` so the pages are resident.
fn touch(bytes: &[u8]) -> u64 {
    bytes.iter().step_by(4096).map(|&b| b as u64).sum()
}

/// The weight bytes of `model` (the count `inspect` and the C ABI report too), with
/// every linear weight page touched so that the resident set holds them before
/// sampling.
fn weight_bytes<B: Backend>(model: &Mmdit<B>) -> Result<WeightBytes> {
    let mut sink = 0u64;
    for req in required_tensors(model.config(), model.prune_spec()) {
        if let Required::Linear { name, n, k } = req {
            sink += match model.weights().linear(&name, n, k)? {
                LinearWeights::Dense { data, .. } => touch(match data {
                    DenseData::F32(d) => bytemuck::cast_slice(d),
                    DenseData::F16(d) => bytemuck::cast_slice(d),
                    DenseData::Bf16(d) => bytemuck::cast_slice(d),
                }),
                LinearWeights::Q4(q) => {
                    touch(q.packed())
                        + touch(bytemuck::cast_slice(q.scales()))
                        + touch(bytemuck::cast_slice(q.offsets()))
                }
            };
        }
    }
    std::hint::black_box(sink);
    model.weight_bytes()
}

/// Runs the hidden `bench model-run`: measures one model and prints its [`ModelRun`]
/// as JSON on stdout (progress on stderr).
pub fn run_child(args: &ModelRunArgs) -> Result<()> {
    let threads = args.threads.unwrap_or_else(rayon::current_num_threads);
    if threads == 0 {
        return Err(Error::invalid("--threads", "must be at least 1"));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::invalid("--threads", e.to_string()))?;
    let run = match args.backend {
        BackendChoice::Cpu => {
            pool.install(|| measure_model(args, threads, |p| Mmdit::load(p), &mut NoDeviceMemory))?
        }
        #[cfg(feature = "cuda")]
        BackendChoice::Cuda => measure_model_cuda(args, threads)?,
        #[cfg(not(feature = "cuda"))]
        BackendChoice::Cuda => {
            check_backend(args.backend)?;
            return Ok(());
        }
    };
    println!(
        "{}",
        serde_json::to_string(&run).map_err(|e| Error::invalid("report", e.to_string()))?
    );
    Ok(())
}

/// Measures one model on the backend `B`: `load` opens it, `probe` reads device
/// memory around the run (nothing on the CPU).
fn measure_model<B: Backend>(
    args: &ModelRunArgs,
    threads: usize,
    load: impl FnOnce(&Path) -> Result<Mmdit<B>>,
    probe: &mut dyn MemoryProbe,
) -> Result<ModelRun> {
    check_run_sizes(args.steps, args.context_tokens)?;
    probe.before_load()?;
    let t = Instant::now();
    let model = load(&args.model)?;
    probe.after_load()?;
    let load_s = t.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let side = latent_side(&cfg, args.resolution)?;
    let bytes = weight_bytes(&model)?;
    let (linear_weight_bytes, other_weight_bytes) = (bytes.linear(), bytes.other);
    let linear_formats = bytes.layers;
    let rss_before = proc_status_bytes("VmRSS");

    let mut rng = StdRng::seed_from_u64(args.seed ^ 0xc0de);
    let ehs = Tensor::random_normal(
        &mut rng,
        vec![1, args.context_tokens, cfg.joint_attention_dim],
    );
    let pooled = Tensor::random_normal(&mut rng, vec![1, cfg.pooled_projection_dim]);
    let cond = Conditioning {
        encoder_hidden_states: &ehs,
        pooled_projections: &pooled,
        negative_encoder_hidden_states: None,
        negative_pooled_projections: None,
    };
    let latent = initial_latent(vec![1, cfg.in_channels, side, side], args.seed)?;
    let opts = SampleOptions {
        steps: args.steps,
        ..SampleOptions::default()
    };
    let start = Instant::now();
    let mut marks = Vec::with_capacity(args.steps + 1);
    let label = &args.label;
    sample(&model, latent, &cond, &opts, |i, n, _| {
        let now = start.elapsed().as_secs_f64();
        if let Some(&prev) = marks.last() {
            probe.after_step();
            eprintln!("  {label}: step {i}/{n} took {:.3} s", now - prev);
        }
        marks.push(now);
    })?;
    let sampling_s = start.elapsed().as_secs_f64();
    probe.after_step();
    marks.push(sampling_s);
    eprintln!(
        "  {label}: step {}/{} took {:.3} s; sampling {sampling_s:.2} s",
        args.steps,
        args.steps,
        marks[marks.len() - 1] - marks[marks.len() - 2]
    );
    let step_s: Vec<f64> = marks.windows(2).map(|w| w[1] - w[0]).collect();
    let mut sorted = step_s.clone();
    sorted.sort_by(f64::total_cmp);
    let peak = proc_status_bytes("VmHWM");
    let device_memory = probe.finish();
    // On a device, the weights and scratch that matter are the device's.
    let (weight_total, scratch) = match &device_memory {
        Some(d) => (d.weights_bytes, d.scratch_peak_bytes),
        None => (
            linear_weight_bytes + other_weight_bytes,
            peak.saturating_sub(rss_before),
        ),
    };
    Ok(ModelRun {
        label: args.label.clone(),
        source: args.model.display().to_string(),
        blocks_total: cfg.num_layers,
        blocks_run: model.prune_spec().kept_blocks(cfg.num_layers).len(),
        linear_formats,
        linear_weight_bytes,
        other_weight_bytes,
        weight_bytes: weight_total,
        load_s,
        rss_before_sampling_bytes: rss_before,
        peak_rss_bytes: peak,
        scratch_bytes: scratch,
        step_median_s: quantile(&sorted, 0.5),
        step_min_s: sorted.first().copied().unwrap_or(f64::NAN),
        step_max_s: sorted.last().copied().unwrap_or(f64::NAN),
        step_s,
        sampling_s,
        threads,
        device_memory,
    })
}
