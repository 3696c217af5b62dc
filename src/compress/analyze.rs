//! [`analyze_model`]: how much each block, and each sub-component of a block, matters.
//!
//! Three scores per block:
//! - **Removal impact** (HierarchicalPrune's importance, with the model's own output in
//!   place of an image-quality metric): the block (or one sub-component: `norm1`,
//!   `norm1_context`, `attn`, `attn2` where present, `ff`, `ff_context` where present)
//!   is replaced by identity, and the predicted velocity is compared with the unpruned
//!   one: relative L2 error `|v' - v| / |v|` and cosine distance `1 - cos(v', v)`, per
//!   input, averaged over the inputs. Costs one forward pass per block and component.
//! - **Block influence**: `1 - cos(x_in, x_out)` of the image stream through the block,
//!   per token, averaged over tokens and inputs; one forward pass for all blocks. A cheap
//!   proxy that ranked layers like removal damage on a real transformer.
//! - **Weight score** (data-free, DIMAP-style energy): within each Linear weight
//!   ("module"), sort the squared weights `a_1 <= ... <= a_n`; weight `j` scores
//!   `a_j / sum_{i : a_i <= a_j} a_i` (its share of the energy of all weights of its
//!   module that are not larger than it). A module whose energy sits in a few dominant
//!   weights scores higher than one with evenly spread magnitudes. The block score is
//!   the mean over every weight of every Linear in the block (so larger modules count in
//!   proportion to their size). 4-bit weights are dequantised first.
//!
//! Inputs: a calibration safetensors file (`hidden_states`, `encoder_hidden_states`,
//! `pooled_projections`, `timestep`; batch = the inputs), or seeded synthetic inputs
//! (standard normal latents and embeddings, timesteps spread over a flow-matching
//! schedule), which the report says.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;

use crate::compress::report::{BlockScores, ComponentScore, SensitivityReport};
use crate::error::{Error, Result};
use crate::model::layout::{Required, block_tensors};
use crate::model::mmdit::Streams;
use crate::model::sampler::{DEFAULT_SHIFT, flow_match_schedule};
use crate::model::{Mmdit, MmditInputs, Tensor, TensorFile};
use crate::quant::{DenseData, LinearWeights};

/// Settings of [`analyze_model`].
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyzeOptions {
    /// Synthetic inputs (when no calibration file is given): how many.
    pub synthetic_inputs: usize,
    /// Synthetic latent side (clamped to what the positional table covers).
    pub latent: usize,
    /// Synthetic context tokens.
    pub tokens: usize,
    /// Seed of the synthetic inputs.
    pub seed: u64,
    /// Also score each sub-component (one forward pass each).
    pub components: bool,
}

impl Default for AnalyzeOptions {
    /// 4 inputs, 16x16 latents, 16 tokens, seed 0, with sub-components.
    fn default() -> Self {
        AnalyzeOptions {
            synthetic_inputs: 4,
            latent: 16,
            tokens: 16,
            seed: 0,
            components: true,
        }
    }
}

/// The four input tensors of a batch.
struct Batch {
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    pooled_projections: Tensor,
    timestep: Tensor,
}

impl Batch {
    fn inputs(&self) -> MmditInputs<'_> {
        MmditInputs {
            hidden_states: &self.hidden_states,
            encoder_hidden_states: &self.encoder_hidden_states,
            pooled_projections: &self.pooled_projections,
            timestep: &self.timestep,
        }
    }
}

/// Seeded synthetic inputs: `n` items, timesteps of an `n`-step schedule.
fn synthetic(model: &Mmdit, opts: &AnalyzeOptions) -> Result<Batch> {
    let cfg = model.config();
    let n = opts.synthetic_inputs;
    if n == 0 {
        return Err(Error::invalid("synthetic inputs", "need at least 1"));
    }
    let p = cfg.patch_size;
    let max_side = cfg.pos_embed_max_size * p;
    let side = (opts.latent.min(max_side) / p * p).max(p);
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let schedule = flow_match_schedule(n, DEFAULT_SHIFT)?;
    Ok(Batch {
        hidden_states: Tensor::random_normal(&mut rng, vec![n, cfg.in_channels, side, side]),
        encoder_hidden_states: Tensor::random_normal(
            &mut rng,
            vec![n, opts.tokens.max(1), cfg.joint_attention_dim],
        ),
        pooled_projections: Tensor::random_normal(&mut rng, vec![n, cfg.pooled_projection_dim]),
        timestep: Tensor {
            data: schedule.timesteps.clone(),
            shape: vec![n],
        },
    })
}

/// Per-item relative L2 error and cosine distance of `y` against `y0`, averaged.
fn compare(y0: &Tensor, y: &Tensor, items: usize) -> (f32, f32) {
    let per = y0.data.len() / items.max(1);
    let mut rel = 0.0f64;
    let mut cd = 0.0f64;
    for b in 0..items {
        let a = &y0.data[b * per..(b + 1) * per];
        let c = &y.data[b * per..(b + 1) * per];
        let (mut diff, mut na, mut nc, mut dot) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (&x, &z) in a.iter().zip(c) {
            let (x, z) = (x as f64, z as f64);
            diff += (x - z) * (x - z);
            na += x * x;
            nc += z * z;
            dot += x * z;
        }
        rel += diff.sqrt() / na.sqrt().max(1e-30);
        cd += 1.0 - dot / (na.sqrt() * nc.sqrt()).max(1e-30);
    }
    ((rel / items as f64) as f32, (cd / items as f64) as f32)
}

/// The components of block `i` that exist and are not already removed.
fn components_of(model: &Mmdit, i: usize) -> Vec<&'static str> {
    let cfg = model.config();
    let last = i + 1 == cfg.num_layers;
    let mask = model.prune_spec().mask(i);
    let mut out = Vec::new();
    for (c, present, removed) in [
        ("norm1", true, mask.norm1),
        ("norm1_context", true, mask.norm1_context),
        ("attn", true, mask.attn),
        ("attn2", cfg.is_dual(i), mask.attn2),
        ("ff", true, mask.ff),
        ("ff_context", !last, mask.ff_context),
    ] {
        if present && !removed {
            out.push(c);
        }
    }
    out
}

/// Block influence `1 - cos(x_in, x_out)` per kept block, from one traced forward.
fn block_influence(model: &Mmdit, batch: &Batch) -> Result<Vec<(usize, f32)>> {
    let inputs = batch.inputs();
    let dims = model.check_inputs(&inputs)?;
    let d = model.config().hidden_size();
    let Streams {
        mut x,
        mut c,
        silu_temb,
    } = model.embed(&inputs, &dims)?;
    let blocks = model.blocks();
    let mut out = Vec::with_capacity(blocks.len());
    for (pos, block) in blocks.iter().enumerate() {
        let i = block.index;
        let before = x.clone();
        model.block(
            block,
            pos + 1 == blocks.len(),
            &mut x,
            &mut c,
            &silu_temb,
            &dims,
        )?;
        let mut sum = 0.0f64;
        let mut count = 0usize;
        for (a, b) in before.data().chunks_exact(d).zip(x.data().chunks_exact(d)) {
            let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
            for (&u, &v) in a.iter().zip(b) {
                dot += u as f64 * v as f64;
                na += u as f64 * u as f64;
                nb += v as f64 * v as f64;
            }
            sum += 1.0 - dot / (na.sqrt() * nb.sqrt()).max(1e-30);
            count += 1;
        }
        out.push((i, (sum / count.max(1) as f64) as f32));
    }
    Ok(out)
}

/// Sum over the weights of one module of `a_j / (sum of a_i <= a_j)`, and the count.
pub fn energy_score(w: &LinearWeights<'_>) -> (f64, usize) {
    let (n, k) = (w.n(), w.k());
    let mut sq: Vec<f32> = Vec::with_capacity(n * k);
    match w {
        LinearWeights::Dense { data, .. } => match data {
            DenseData::F32(d) => sq.extend(d.iter().map(|v| v * v)),
            DenseData::F16(d) => sq.extend(d.iter().map(|v| v.to_f32() * v.to_f32())),
            DenseData::Bf16(d) => sq.extend(d.iter().map(|v| v.to_f32() * v.to_f32())),
        },
        LinearWeights::Q4(q) => {
            let mut row = vec![0.0f32; k];
            for r in 0..n {
                q.dequantize_row(r, &mut row);
                sq.extend(row.iter().map(|v| v * v));
            }
        }
    }
    sq.par_sort_unstable_by(f32::total_cmp);
    let mut total = 0.0f64;
    let mut cum = 0.0f64;
    let mut j = 0;
    while j < sq.len() {
        // A run of equal values shares one denominator (all of them are "not larger").
        let mut e = j;
        while e < sq.len() && sq[e] == sq[j] {
            e += 1;
        }
        let a = sq[j] as f64;
        cum += a * (e - j) as f64;
        if cum > 0.0 {
            total += (e - j) as f64 * a / cum;
        }
        j = e;
    }
    (total, sq.len())
}

/// Data-free weight score of block `i` (see the module docs).
fn weight_score(model: &Mmdit, i: usize) -> Result<f32> {
    let mut total = 0.0f64;
    let mut count = 0usize;
    for req in block_tensors(model.config(), i, model.prune_spec()) {
        if let Required::Linear { name, n, k } = req {
            let w = model.weights().linear(&name, n, k)?;
            let (s, c) = energy_score(&w);
            total += s;
            count += c;
        }
    }
    Ok((total / count.max(1) as f64) as f32)
}

/// Analyses every kept block of `model` (named `name` in the report) on the
/// calibration inputs, or on seeded synthetic ones when `calib` is `None`.
/// `progress(done, total)` is called after each step. The model's own pruning plan is
/// the baseline and is restored before returning.
pub fn analyze_model(
    model: &mut Mmdit,
    name: &str,
    calib: Option<&TensorFile>,
    opts: &AnalyzeOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SensitivityReport> {
    let (batch, inputs_desc, synthetic_inputs) = match calib {
        Some(f) => {
            let b = Batch {
                hidden_states: f.get("hidden_states")?.clone(),
                encoder_hidden_states: f.get("encoder_hidden_states")?.clone(),
                pooled_projections: f.get("pooled_projections")?.clone(),
                timestep: f.get("timestep")?.clone(),
            };
            let desc = format!("calibration file {}", f.path().display());
            (b, desc, false)
        }
        None => {
            let b = synthetic(model, opts)?;
            let desc = format!(
                "synthetic: seed {}, {} inputs, {}x{} latents, {} context tokens, timesteps {:?} \
                 (no calibration file given)",
                opts.seed,
                opts.synthetic_inputs,
                b.hidden_states.shape[2],
                b.hidden_states.shape[3],
                b.encoder_hidden_states.shape[1],
                b.timestep.data
            );
            (b, desc, true)
        }
    };
    let items = batch.hidden_states.shape.first().copied().unwrap_or(1);
    let base_spec = model.prune_spec().clone();
    let kept = base_spec.kept_blocks(model.config().num_layers);
    let comps: Vec<Vec<&'static str>> = kept
        .iter()
        .map(|&i| {
            if opts.components {
                components_of(model, i)
            } else {
                Vec::new()
            }
        })
        .collect();
    let total = 2 + kept.len() * 2 + comps.iter().map(Vec::len).sum::<usize>();
    let mut done = 0;
    let mut step = |progress: &mut dyn FnMut(usize, usize)| {
        done += 1;
        progress(done, total);
    };

    let y0 = model.forward(&batch.inputs())?;
    step(progress);
    let influence = block_influence(model, &batch)?;
    step(progress);

    let result = (|| -> Result<Vec<BlockScores>> {
        let mut blocks = Vec::with_capacity(kept.len());
        for (bi, &i) in kept.iter().enumerate() {
            let mut spec = base_spec.clone();
            spec.removed_blocks.insert(i);
            model.set_prune(spec)?;
            let y = model.forward(&batch.inputs())?;
            let (rel_l2, cos_dist) = compare(&y0, &y, items);
            step(progress);
            let mut components = Vec::new();
            for &c in &comps[bi] {
                let mut spec = base_spec.clone();
                spec.remove_component(i, c)?;
                model.set_prune(spec)?;
                let y = model.forward(&batch.inputs())?;
                let (rel_l2, cos_dist) = compare(&y0, &y, items);
                components.push(ComponentScore {
                    component: c.to_string(),
                    rel_l2,
                    cos_dist,
                });
                step(progress);
            }
            model.set_prune(base_spec.clone())?;
            let weight_score = weight_score(model, i)?;
            step(progress);
            blocks.push(BlockScores {
                block: i,
                rel_l2: Some(rel_l2),
                cos_dist: Some(cos_dist),
                influence: influence.iter().find(|p| p.0 == i).map(|p| p.1),
                weight_score,
                components,
            });
        }
        Ok(blocks)
    })();
    model.set_prune(base_spec)?;
    let blocks = result?;
    Ok(SensitivityReport {
        model: name.to_string(),
        num_layers: model.config().num_layers,
        inputs: inputs_desc,
        synthetic_inputs,
        num_inputs: items,
        blocks,
    })
}

/// Only the data-free weight scores (no forward passes), for every kept block.
pub fn weight_scores(model: &Mmdit, name: &str) -> Result<SensitivityReport> {
    let kept = model.prune_spec().kept_blocks(model.config().num_layers);
    let blocks = kept
        .iter()
        .map(|&i| {
            Ok(BlockScores {
                block: i,
                rel_l2: None,
                cos_dist: None,
                influence: None,
                weight_score: weight_score(model, i)?,
                components: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SensitivityReport {
        model: name.to_string(),
        num_layers: model.config().num_layers,
        inputs: "none (data-free weight scores only)".to_string(),
        synthetic_inputs: false,
        num_inputs: 0,
        blocks,
    })
}
