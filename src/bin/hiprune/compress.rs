//! `hiprune compress`, `hiprune generate` and `hiprune analyze`: the compression
//! toolchain on the command line.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use hiprune::backend::CpuBackend;
use hiprune::compress::quantize::pos_table_is_sincos;
use hiprune::compress::{
    AnalyzeOptions, CompressOptions, GenerateOptions, PlanOptions, PlanTarget, Preset,
    ProtectPrecision, SensitivityReport, WeightFormat, analyze_model, compress_opened,
    generate_checkpoint, generate_single_file, make_plan,
};
use hiprune::model::{Mmdit, PruneSpec, TensorFile};
use hiprune::{Error, Result};

use crate::report::human_bytes;
use crate::source::CheckpointArgs;

/// Weight storage on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WeightsArg {
    /// Symmetric INT4, one f16 scale per group, w = scale * (q - 8) (4.25 bits per
    /// weight at --group 64).
    Int4,
    /// Asymmetric INT4, f16 scale and offset per group (4.5 bits per weight at --group
    /// 64).
    #[value(name = "int4-asym")]
    Int4Asym,
    /// NF4, per-block absmax.
    Nf4,
    /// Dense f16.
    F16,
    /// Dense f32.
    F32,
}

impl From<WeightsArg> for WeightFormat {
    fn from(w: WeightsArg) -> Self {
        match w {
            WeightsArg::Int4 => WeightFormat::Int4,
            WeightsArg::Int4Asym => WeightFormat::Int4Asym,
            WeightsArg::Nf4 => WeightFormat::Nf4,
            WeightsArg::F16 => WeightFormat::F16,
            WeightsArg::F32 => WeightFormat::F32,
        }
    }
}

/// Precision of protected blocks on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProtectArg {
    /// Dense f16.
    F16,
    /// Like every other block.
    Int4,
}

/// Pruning-plan options shared by `compress`.
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// A published cut, as the released HierarchicalPrune scripts remove it:
    /// sd35-large-turbo (removes 25-28 and 31-34 of 38, their "25-29,31-35" with
    /// end-exclusive ranges; 30 remain) or sd35-medium (removes 13,15,16,18,20,21 of 24;
    /// 18 remain).
    #[arg(long)]
    preset: Option<String>,
    /// Remove exactly these blocks and sub-components, comma-separated: original block
    /// indices (`25,26`) and BLOCK.COMPONENT entries (`12.ff,14.attn2`; components:
    /// norm1, norm1_context, attn, attn2, ff, ff_context). Sub-component entries
    /// combine with the other targets.
    #[arg(long, visible_alias = "remove-blocks", value_name = "LIST")]
    remove: Option<String>,
    /// Keep this many blocks, removing the lowest-cost ones.
    #[arg(long)]
    target_blocks: Option<usize>,
    /// Remove blocks until the package is estimated at most this many bytes.
    #[arg(long)]
    target_bytes: Option<u64>,
    /// Remove blocks until the package is estimated at most this fraction of the
    /// unpruned model in f16.
    #[arg(long)]
    target_ratio: Option<f64>,
    /// Blocks 0..K are never removed.
    #[arg(long)]
    protect_until: Option<usize>,
    /// Precision of the protected blocks (before the first removed block).
    #[arg(long, value_enum, default_value = "int4")]
    protect_precision: ProtectArg,
    /// Weight of the positional prior (0 = measured sensitivity only, 1 = position only).
    #[arg(long, default_value_t = 0.3)]
    position_weight: f32,
    /// A report from `hiprune analyze` (sensitivity per block).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the plan (removed blocks, freeze mask, distillation weights) as JSON here.
    #[arg(long)]
    plan_output: Option<PathBuf>,
}

impl PlanArgs {
    /// The `--remove` list: its whole blocks and its sub-component cuts.
    fn removals(&self) -> Result<PruneSpec> {
        self.remove
            .as_deref()
            .map_or_else(|| Ok(PruneSpec::none()), PruneSpec::parse_removals)
    }

    fn target(&self) -> Result<PlanTarget> {
        let mut targets = Vec::new();
        if let Some(p) = &self.preset {
            targets.push(PlanTarget::Preset(p.clone()));
        }
        let removals = self.removals()?;
        if !removals.removed_blocks.is_empty() {
            targets.push(PlanTarget::Remove(removals.removed_blocks));
        }
        if let Some(n) = self.target_blocks {
            targets.push(PlanTarget::Blocks(n));
        }
        if let Some(b) = self.target_bytes {
            targets.push(PlanTarget::Bytes(b));
        }
        if let Some(r) = self.target_ratio {
            targets.push(PlanTarget::Ratio(r));
        }
        match targets.len() {
            0 => Ok(PlanTarget::None),
            1 => Ok(targets.remove(0)),
            _ => Err(Error::invalid(
                "plan options",
                "give at most one of --preset, --remove (with blocks), --target-blocks, --target-bytes, --target-ratio",
            )),
        }
    }
}

/// Options of `hiprune compress`.
#[derive(Args, Debug)]
pub struct CompressArgs {
    /// A diffusers transformer folder (config.json + safetensors, single or sharded) or a
    /// single-file checkpoint (Stability AI's names; pruned ones with gaps included).
    source: PathBuf,
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// The package to write (replaced only on success).
    #[arg(short, long)]
    output: PathBuf,
    /// Storage of the Linear weights.
    #[arg(long, value_enum, default_value = "int4")]
    weights: WeightsArg,
    /// Group (block) size of the 4-bit weights: 32, 64 or 128.
    #[arg(long, default_value_t = 64)]
    group: usize,
    /// INT4: search each group for a clipped range with a smaller error (slower).
    #[arg(long)]
    clip_search: bool,
    #[command(flatten)]
    plan: PlanArgs,
}

/// A percent line on stderr, rewritten in place.
struct PercentLine {
    last: i64,
    shown: f64,
    start: Instant,
}

impl PercentLine {
    fn new() -> Self {
        PercentLine {
            last: -1,
            shown: -1.0,
            start: Instant::now(),
        }
    }

    fn update(&mut self, what: &str, done: u64, total: u64) {
        let pct = (done as f64 * 100.0 / total.max(1) as f64) as i64;
        let elapsed = self.start.elapsed().as_secs_f64();
        if pct != self.last && (pct == 100 || elapsed - self.shown >= 0.5) {
            self.shown = elapsed;
            self.last = pct;
            eprint!(
                "\r{what}: {pct:3}% ({:.0} s)   ",
                self.start.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
    }

    fn finish(&self) {
        eprintln!();
    }
}

/// Runs `hiprune compress`.
pub fn run_compress(args: &CompressArgs) -> Result<()> {
    let checkpoint = args.checkpoint.open(&args.source)?;
    let config = checkpoint.config.clone();
    let report = match &args.plan.report {
        Some(p) => Some(SensitivityReport::from_file(p)?),
        None => None,
    };
    let weights: WeightFormat = args.weights.into();
    // The size estimates count the positional table only when the package will store
    // it (one read of the table, compared in strips).
    let pos_table_computed = pos_table_is_sincos(&checkpoint.weights, &config)?;
    let plan = make_plan(
        &config,
        report.as_ref(),
        &PlanOptions {
            target: args.plan.target()?,
            protect_until: args.plan.protect_until,
            protect_precision: match args.plan.protect_precision {
                ProtectArg::F16 => ProtectPrecision::F16,
                ProtectArg::Int4 => ProtectPrecision::Int4,
            },
            position_weight: args.plan.position_weight,
            weights,
            group: args.group,
            pos_table_computed,
            absent_blocks: checkpoint.spec.removed_blocks.clone(),
            remove_components: args.plan.removals()?.masks,
        },
    )?;
    if !plan.proposed_components.is_empty() {
        eprintln!(
            "proposed sub-component cuts (cheaper than the costliest removed block; pass \
             them with --remove): {}",
            plan.proposed_components.join(",")
        );
    }
    eprintln!("plan: {}", plan.summary);
    if let Some(p) = &args.plan.plan_output {
        let text = plan.to_json()?;
        std::fs::write(p, text).map_err(|e| Error::io(p, e))?;
    }
    let opts = plan.compress_options(CompressOptions {
        weights,
        group: args.group,
        clip_search: args.clip_search,
        ..CompressOptions::default()
    });
    let start = Instant::now();
    let mut bar = PercentLine::new();
    let summary = compress_opened(&checkpoint, &args.output, &opts, &mut |p| {
        bar.update("compress", p.done, p.total)
    });
    bar.finish();
    let summary = summary?;
    for (name, reason) in &summary.dense_layers {
        if !reason.is_empty() {
            eprintln!("kept dense: {name}: {reason}");
        }
    }
    println!(
        "wrote {} in {:.1} s: {} layers in 4 bits, {} dense, kept blocks {:?}",
        summary.output.display(),
        start.elapsed().as_secs_f64(),
        summary.quantized_layers,
        summary.dense_layers.len(),
        summary.kept_blocks
    );
    println!(
        "before {} ({} bytes) -> after {} ({} bytes): {:.1}% smaller ({:.2}% of the source)",
        human_bytes(summary.source_bytes),
        summary.source_bytes,
        human_bytes(summary.output_bytes),
        summary.output_bytes,
        100.0 * summary.reduction(),
        100.0 * (1.0 - summary.reduction())
    );
    Ok(())
}

/// Options of `hiprune generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The folder to write (created if missing), or with --single-file the file.
    output: PathBuf,
    /// Write one single-file checkpoint with Stability AI's tensor names (fused qkv)
    /// instead of a diffusers folder; the same values.
    #[arg(long)]
    single_file: bool,
    /// Model shape: sd35-large, sd35-medium or tiny.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Override the number of blocks.
    #[arg(long)]
    layers: Option<usize>,
    /// Stored dtype.
    #[arg(long, value_parser = ["f16", "f32"], default_value = "f16")]
    dtype: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs `hiprune generate`.
pub fn run_generate(args: &GenerateArgs) -> Result<()> {
    let mut config = Preset::parse(&args.preset)?.config();
    if let Some(n) = args.layers {
        config = GenerateOptions::with_layers(config, n);
    }
    let opts = GenerateOptions {
        f16: args.dtype == "f16",
        seed: args.seed,
        ..GenerateOptions::new(config)
    };
    let start = Instant::now();
    let s = if args.single_file {
        generate_single_file(&args.output, &opts)?
    } else {
        generate_checkpoint(&args.output, &opts)?
    };
    println!(
        "wrote {} ({} tensors, {} file(s), {}) in {:.1} s",
        args.output.display(),
        s.tensors,
        s.shards.len(),
        human_bytes(s.total_bytes),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Options of `hiprune analyze`.
#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// A diffusers transformer folder, a single-file checkpoint or an .hpk package.
    model: PathBuf,
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    /// Calibration inputs: a safetensors file with `hidden_states`,
    /// `encoder_hidden_states`, `pooled_projections` and `timestep` (batch = inputs).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(short, long)]
    output: PathBuf,
    /// Also write an SVG plot of the scores by block position.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Synthetic inputs: how many.
    #[arg(long, default_value_t = 4)]
    inputs: usize,
    /// Synthetic inputs: latent side (pixels of the latent).
    #[arg(long, default_value_t = 16)]
    latent: usize,
    /// Synthetic inputs: context tokens.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Synthetic inputs: seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the per-sub-component removals (blocks only).
    #[arg(long)]
    no_components: bool,
}

/// Runs `hiprune analyze`.
pub fn run_analyze(args: &AnalyzeArgs) -> Result<()> {
    let mut model = Mmdit::from_checkpoint(CpuBackend::new(), args.checkpoint.open(&args.model)?)?;
    let calib = match &args.calib {
        Some(p) => Some(TensorFile::open(p)?),
        None => None,
    };
    let opts = AnalyzeOptions {
        synthetic_inputs: args.inputs,
        latent: args.latent,
        tokens: args.tokens,
        seed: args.seed,
        components: !args.no_components,
    };
    let mut bar = PercentLine::new();
    let report = analyze_model(
        &mut model,
        &name_of(&args.model),
        calib.as_ref(),
        &opts,
        &mut |done, total| bar.update("analyze", done as u64, total as u64),
    );
    bar.finish();
    let report = report?;
    report.write(&args.output)?;
    if let Some(svg) = &args.svg {
        std::fs::write(svg, report.svg()).map_err(|e| Error::io(svg, e))?;
    }
    println!("inputs: {}", report.inputs);
    println!("block  rel_l2    cos_dist  influence  weight");
    for b in &report.blocks {
        let f = |v: Option<f32>| v.map_or("-".to_string(), |v| format!("{v:.5}"));
        println!(
            "{:5}  {:8}  {:8}  {:9}  {:.5}",
            b.block,
            f(b.rel_l2),
            f(b.cos_dist),
            f(b.influence),
            b.weight_score
        );
    }
    println!("wrote {}", args.output.display());
    Ok(())
}

/// The file or folder name of `p`.
pub fn name_of(p: &Path) -> String {
    p.canonicalize()
        .ok()
        .and_then(|c| c.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| p.display().to_string())
}
