//! `hiprune demo`: the whole toolchain on a small seeded model. Generates an MMDiT
//! checkpoint (D = 256, 8 blocks, f16), analyses its blocks on synthetic inputs, plans
//! the removal of two late blocks, compresses it to INT4, loads the package and runs a
//! short sampling loop with the original and the compressed model, then reports size,
//! step latency and output error.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use hiprune::compress::{
    AnalyzeOptions, CompressOptions, GenerateOptions, PlanOptions, PlanTarget, Preset,
    analyze_model, compress_checkpoint, generate_checkpoint, make_plan,
};
use hiprune::model::sampler::{Conditioning, initial_latent};
use hiprune::model::{Mmdit, MmditConfig, SampleOptions, Tensor, sample};
use hiprune::{Error, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::report::{Table, cpu_model, human_bytes};

/// Options of `hiprune demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Hidden size D (a multiple of 64).
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Blocks of the generated model.
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Blocks to remove.
    #[arg(long, default_value_t = 2)]
    remove: usize,
    /// Sampling steps.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Latent side (the image is 8x larger).
    #[arg(long, default_value_t = 32)]
    latent: usize,
    /// Seed of the weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the checkpoint, report and package in this folder (default: a temporary
    /// folder, removed at exit).
    #[arg(long)]
    keep: Option<PathBuf>,
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

/// Runs `hiprune demo`.
pub fn run(args: &DemoArgs) -> Result<()> {
    if args.hidden == 0 || !args.hidden.is_multiple_of(64) {
        return Err(Error::invalid(
            "--hidden",
            "must be a positive multiple of 64",
        ));
    }
    if args.remove + 1 >= args.layers {
        return Err(Error::invalid("--remove", "must leave at least two blocks"));
    }
    let tmp;
    let dir = match &args.keep {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
            tmp.path().to_path_buf()
        }
    };
    let total = Instant::now();
    let d = args.hidden;
    let config = MmditConfig {
        sample_size: args.latent,
        pos_embed_max_size: args.latent.div_ceil(2).max(16),
        num_layers: args.layers,
        num_attention_heads: d / 64,
        attention_head_dim: 64,
        caption_projection_dim: d,
        joint_attention_dim: 256,
        pooled_projection_dim: 256,
        ..Preset::Tiny.config()
    };
    println!(
        "hiprune demo on {} ({} threads)",
        cpu_model(),
        rayon::current_num_threads()
    );

    // 1. A seeded checkpoint.
    let ckpt = dir.join("checkpoint");
    let t = Instant::now();
    generate_checkpoint(
        &ckpt,
        &GenerateOptions {
            seed: args.seed,
            ..GenerateOptions::new(config.clone())
        },
    )?;
    println!(
        "1. generated a {}-block MMDiT (D = {d}, f16) in {:.1} s",
        args.layers,
        t.elapsed().as_secs_f64()
    );

    // 2. Sensitivity of each block and sub-component.
    let t = Instant::now();
    let mut dense = Mmdit::load(&ckpt)?;
    let report = analyze_model(
        &mut dense,
        "demo",
        None,
        &AnalyzeOptions {
            synthetic_inputs: 2,
            latent: 16,
            tokens: 16,
            seed: args.seed,
            components: true,
        },
        &mut |_, _| {},
    )?;
    report.write(&dir.join("report.json"))?;
    std::fs::write(dir.join("report.svg"), report.svg())
        .map_err(|e| Error::io(dir.join("report.svg"), e))?;
    let scores: Vec<String> = report
        .blocks
        .iter()
        .map(|b| format!("{}:{:.3}", b.block, b.rel_l2.unwrap_or(0.0)))
        .collect();
    println!(
        "2. analysed removal impact (rel. L2 of the velocity) in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        scores.join(" ")
    );

    // 3. Plan: remove the least important late blocks (the first half is protected).
    let plan = make_plan(
        &config,
        Some(&report),
        &PlanOptions {
            target: PlanTarget::Blocks(args.layers - args.remove),
            protect_until: Some(args.layers / 2),
            ..PlanOptions::default()
        },
    )?;
    println!("3. plan: {}", plan.summary);

    // 4. Compress to INT4.
    let t = Instant::now();
    let package = dir.join("model.hpk");
    let summary = compress_checkpoint(
        &ckpt,
        &package,
        &plan.compress_options(CompressOptions::default()),
        &mut |_| {},
    )?;
    println!(
        "4. compressed to INT4 g64 in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        package.display()
    );

    // 5. Sample with both.
    let compressed = Mmdit::load(&package)?;
    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
    let ehs = Tensor::random_normal(&mut rng, vec![1, 32, config.joint_attention_dim]);
    let pooled = Tensor::random_normal(&mut rng, vec![1, config.pooled_projection_dim]);
    let cond = Conditioning {
        encoder_hidden_states: &ehs,
        pooled_projections: &pooled,
        negative_encoder_hidden_states: None,
        negative_pooled_projections: None,
    };
    let opts = SampleOptions {
        steps: args.steps,
        ..SampleOptions::default()
    };
    let latent = initial_latent(
        vec![1, config.in_channels, args.latent, args.latent],
        args.seed,
    )?;
    let run = |m: &Mmdit| -> Result<(Tensor, f64)> {
        let t = Instant::now();
        let out = sample(m, latent.clone(), &cond, &opts, |_, _, _| {})?;
        Ok((out, t.elapsed().as_secs_f64() / args.steps as f64))
    };
    let (ref_out, ref_step) = run(&dense)?;
    let (q_out, q_step) = run(&compressed)?;
    println!(
        "5. sampled {} steps of a {}x{} latent with both models",
        args.steps, args.latent, args.latent
    );
    println!();

    let mut table = Table::new(&[
        "model",
        "blocks",
        "bytes",
        "step latency",
        "output rel. error",
    ]);
    table.row(vec![
        "original (f16)".into(),
        args.layers.to_string(),
        human_bytes(summary.source_bytes),
        format!("{:.1} ms", ref_step * 1e3),
        "-".into(),
    ]);
    table.row(vec![
        "pruned + INT4".into(),
        summary.kept_blocks.len().to_string(),
        human_bytes(summary.output_bytes),
        format!("{:.1} ms", q_step * 1e3),
        format!("{:.4}", rel_l2(&ref_out.data, &q_out.data)),
    ]);
    print!("{}", table.render());
    println!(
        "size: {:.1}% smaller; step latency: {:.2}x; total demo time {:.1} s",
        100.0 * summary.reduction(),
        ref_step / q_step.max(1e-12),
        total.elapsed().as_secs_f64()
    );
    println!("(random weights: the error shows what pruning + 4 bits change, not image quality)");
    Ok(())
}
