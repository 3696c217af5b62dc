//! The flow-matching Euler sampler of Stable Diffusion 3, with the schedule of
//! diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift)`.
//!
//! Schedule: the scheduler shifts its training sigmas once when it is built, so its
//! `sigma_min` is already shifted (f32); `set_timesteps(n)` then takes
//! `linspace(1000 * sigma_max, 1000 * sigma_min, n) / 1000` in f64 and shifts again
//! with `sigma' = shift s / (1 + (shift - 1) s)`, rounds to f32, sets
//! `timesteps = sigmas * 1000` (f32) and appends sigma 0. A step is
//! `x += (sigma[i+1] - sigma[i]) * v` with `v` the model's prediction at
//! `timestep[i]`; with classifier-free guidance the model runs on the batch
//! `[uncond; cond]` and `v = v_u + g (v_c - v_u)`.
//!
//! The seeded initial latent ([`initial_latent`]) comes from `rand`'s `StdRng` and a
//! Box-Muller transform: it is NOT torch's random stream, so a seed does not give the
//! latent diffusers would draw for it. Pass the latent explicitly to reproduce one.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::inputs::check_finite;
use crate::model::mmdit::{Mmdit, MmditInputs};
use crate::model::tensor::Tensor;

/// Training timesteps of the SD3 scheduler.
pub const NUM_TRAIN_TIMESTEPS: usize = 1000;
/// Default schedule shift of SD3 / SD3.5.
pub const DEFAULT_SHIFT: f64 = 3.0;

/// Sigmas (`steps + 1`, ending with 0) and timesteps (`steps`) of a sampling run.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Noise levels, from 1 down to 0.
    pub sigmas: Vec<f32>,
    /// Model timesteps, `sigma * 1000`.
    pub timesteps: Vec<f32>,
}

/// The schedule of `FlowMatchEulerDiscreteScheduler(1000, shift).set_timesteps(steps)`.
pub fn flow_match_schedule(steps: usize, shift: f64) -> Result<Schedule> {
    if steps == 0 {
        return Err(Error::invalid("steps", "must be at least 1"));
    }
    if !(shift.is_finite() && shift > 0.0) {
        return Err(Error::invalid(
            "shift",
            format!("{shift} is not a positive number"),
        ));
    }
    let n_train = NUM_TRAIN_TIMESTEPS as f32;
    // Construction: the smallest training sigma 1/1000, shifted in f32.
    let shift32 = shift as f32;
    let s0 = 1.0f32 / n_train;
    let sigma_min = (shift32 * s0 / (1.0 + (shift32 - 1.0) * s0)) as f64;
    let sigma_max = {
        let s = 1.0f32;
        (shift32 * s / (1.0 + (shift32 - 1.0) * s)) as f64
    };
    let (start, stop) = (sigma_max * 1000.0, sigma_min * 1000.0);
    let mut sigmas = Vec::with_capacity(steps + 1);
    for i in 0..steps {
        let t = if steps == 1 {
            start
        } else if i + 1 == steps {
            stop
        } else {
            i as f64 * ((stop - start) / (steps - 1) as f64) + start
        };
        let s = t / NUM_TRAIN_TIMESTEPS as f64;
        sigmas.push((shift * s / (1.0 + (shift - 1.0) * s)) as f32);
    }
    let timesteps = sigmas.iter().map(|&s| s * n_train).collect();
    sigmas.push(0.0);
    Ok(Schedule { sigmas, timesteps })
}

/// Largest seeded latent [`initial_latent`] makes (1 GiB of f32).
pub const MAX_LATENT_ELEMENTS: usize = 1 << 28;

/// A latent of standard normal values from `seed` (see the module docs: not torch's
/// generator). Shapes over [`MAX_LATENT_ELEMENTS`] are an [`Error::InvalidArgument`].
pub fn initial_latent(shape: Vec<usize>, seed: u64) -> Result<Tensor> {
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_LATENT_ELEMENTS)
        .ok_or_else(|| {
            Error::invalid(
                "latent shape",
                format!("{shape:?} exceeds the cap of {MAX_LATENT_ELEMENTS} elements"),
            )
        })?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = Vec::with_capacity(n + 1);
    while data.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        data.push((r * a.cos()) as f32);
        data.push((r * a.sin()) as f32);
    }
    data.truncate(n);
    Ok(Tensor { data, shape })
}

/// Options of [`sample`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    /// Denoising steps.
    pub steps: usize,
    /// Schedule shift ([`DEFAULT_SHIFT`]).
    pub shift: f64,
    /// Classifier-free guidance scale; `None` (or a scale <= 1) runs the conditional
    /// prediction only.
    pub guidance: Option<f32>,
}

impl Default for SampleOptions {
    /// 28 steps, shift 3, no guidance.
    fn default() -> Self {
        SampleOptions {
            steps: 28,
            shift: DEFAULT_SHIFT,
            guidance: None,
        }
    }
}

/// Prompt conditioning of a sampling run (`[B, T, J]` and `[B, P]`), with the negative
/// prompt's embeddings when guidance is used.
#[derive(Debug, Clone, Copy)]
pub struct Conditioning<'a> {
    /// Prompt embeddings.
    pub encoder_hidden_states: &'a Tensor,
    /// Pooled prompt embeddings.
    pub pooled_projections: &'a Tensor,
    /// Negative prompt embeddings (needed when guidance > 1).
    pub negative_encoder_hidden_states: Option<&'a Tensor>,
    /// Negative pooled embeddings (needed when guidance > 1).
    pub negative_pooled_projections: Option<&'a Tensor>,
}

fn concat_batch(a: &Tensor, b: &Tensor) -> Tensor {
    let mut shape = a.shape.clone();
    if let Some(s) = shape.first_mut() {
        *s += b.shape.first().copied().unwrap_or(0);
    }
    let mut data = a.data.clone();
    data.extend_from_slice(&b.data);
    Tensor { data, shape }
}

/// Runs the Euler loop from `latent` `[B, C, H, W]`; `progress(step, steps, sigma)` is
/// called before each step. Returns the final latent.
pub fn sample<B: Backend>(
    model: &Mmdit<B>,
    latent: Tensor,
    cond: &Conditioning<'_>,
    opts: &SampleOptions,
    mut progress: impl FnMut(usize, usize, f32),
) -> Result<Tensor> {
    let done = sample_cancellable(model, latent, cond, opts, |i, n, s| {
        progress(i, n, s);
        true
    })?;
    done.ok_or_else(|| Error::invalid("sampling", "stopped although no step asked to stop"))
}

/// [`sample`] whose `progress(step, steps, sigma)` decides whether to go on: when it
/// returns `false` the loop stops before that step and the result is `Ok(None)`.
pub fn sample_cancellable<B: Backend>(
    model: &Mmdit<B>,
    latent: Tensor,
    cond: &Conditioning<'_>,
    opts: &SampleOptions,
    mut progress: impl FnMut(usize, usize, f32) -> bool,
) -> Result<Option<Tensor>> {
    let schedule = flow_match_schedule(opts.steps, opts.shift)?;
    check_finite("latent", &latent)?;
    let guidance = opts.guidance.filter(|&g| g > 1.0);
    if let Some(g) = guidance
        && !g.is_finite()
    {
        return Err(Error::invalid("guidance", format!("{g} is not finite")));
    }
    let batch = latent.shape.first().copied().unwrap_or(0);
    let (ehs, pooled) = match guidance {
        None => (
            cond.encoder_hidden_states.clone(),
            cond.pooled_projections.clone(),
        ),
        Some(_) => {
            let ne = cond
                .negative_encoder_hidden_states
                .ok_or_else(|| Error::MissingTensor {
                    tensor: "negative_encoder_hidden_states".to_string(),
                })?;
            let np = cond
                .negative_pooled_projections
                .ok_or_else(|| Error::MissingTensor {
                    tensor: "negative_pooled_projections".to_string(),
                })?;
            if ne.shape != cond.encoder_hidden_states.shape {
                return Err(Error::ShapeMismatch {
                    tensor: "negative_encoder_hidden_states".to_string(),
                    expected: cond.encoder_hidden_states.shape.clone(),
                    found: ne.shape.clone(),
                });
            }
            if np.shape != cond.pooled_projections.shape {
                return Err(Error::ShapeMismatch {
                    tensor: "negative_pooled_projections".to_string(),
                    expected: cond.pooled_projections.shape.clone(),
                    found: np.shape.clone(),
                });
            }
            (
                concat_batch(ne, cond.encoder_hidden_states),
                concat_batch(np, cond.pooled_projections),
            )
        }
    };
    let mut x = latent;
    let steps = opts.steps;
    for i in 0..steps {
        let (sigma, sigma_next) = (schedule.sigmas[i], schedule.sigmas[i + 1]);
        if !progress(i, steps, sigma) {
            return Ok(None);
        }
        let model_in = match guidance {
            None => x.clone(),
            Some(_) => concat_batch(&x, &x),
        };
        let nb = model_in.shape[0];
        let t = Tensor {
            data: vec![schedule.timesteps[i]; nb],
            shape: vec![nb],
        };
        let v = model.forward(&MmditInputs {
            hidden_states: &model_in,
            encoder_hidden_states: &ehs,
            pooled_projections: &pooled,
            timestep: &t,
        })?;
        let dt = sigma_next - sigma;
        match guidance {
            None => {
                for (a, &b) in x.data.iter_mut().zip(&v.data) {
                    *a += dt * b;
                }
            }
            Some(g) => {
                let half = v.data.len() / 2;
                let (vu, vc) = v.data.split_at(half);
                for ((a, &u), &c) in x.data.iter_mut().zip(vu).zip(vc) {
                    *a += dt * (u + g * (c - u));
                }
            }
        }
        debug_assert_eq!(x.shape[0], batch);
    }
    Ok(Some(x))
}
