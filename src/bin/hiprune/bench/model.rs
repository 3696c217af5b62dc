//! `hiprune bench model`: per-step latency, end-to-end sampling time and memory of a
//! whole model, the dense original and the compressed model side by side.
//!
//! Each model is measured in a child process (this binary re-run with the hidden
//! `bench model-run` subcommand, which prints one JSON object on stdout), so the peak
//! resident set reported for a model is that model's alone.

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
use hiprune::model::{
    Checkpoint, CheckpointKind, CheckpointOptions, Mmdit, MmditConfig, PruneSpec, SampleOptions,
    Tensor, WeightBytes, sample,
};
use hiprune::quant::{DenseData, LinearWeights};
use hiprune::{Error, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;

#[cfg(feature = "cuda")]
use super::probe::CudaMemoryProbe;
use super::probe::{
    MemoryProbe, NoDeviceMemory, backend_name, check_backend, gpu_info, proc_status_bytes, touch,
};
use super::report::{ModelReport, ModelRun, Settings, compare, model_csv, model_table, quantile};
use crate::forward::BackendChoice;
use crate::report::{OutputFormat, ReportHeader};

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
        (None, Some(path)) if Checkpoint::kind_of(path)? != CheckpointKind::Package => {
            let cfg = Checkpoint::open(path, &CheckpointOptions::default())?.config;
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
                    "apply to a checkpoint (diffusers folder or single file) or --generate; a package \
                     is measured as it is",
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
        Checkpoint::kind_of(c).is_ok_and(|k| k != CheckpointKind::Package)
            && Checkpoint::open(c, &CheckpointOptions::default())
                .and_then(|ck| ck.file_bytes())
                .is_ok_and(|b| b == bytes)
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
