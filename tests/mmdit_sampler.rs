//! The flow-matching schedule and the Euler sampler against diffusers'
//! `FlowMatchEulerDiscreteScheduler` + `StableDiffusion3Pipeline` loop (fixture `sd35`).

mod common;

use common::{fixture, rel_err};

use hiprune::model::sampler::{
    Conditioning, SampleOptions, flow_match_schedule, initial_latent, sample,
};
use hiprune::model::{Mmdit, Tensor, TensorFile};

fn outputs() -> TensorFile {
    TensorFile::open(fixture("sd35/sample_outputs.safetensors")).unwrap()
}

fn assert_close(got: &[f32], want: &Tensor, what: &str) {
    assert_eq!(got.len(), want.data.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(&want.data).enumerate() {
        assert!((g - w).abs() <= 1e-6, "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn schedule_matches_diffusers() {
    let out = outputs();
    let s = flow_match_schedule(4, 3.0).unwrap();
    assert_close(&s.sigmas, out.get("sigmas").unwrap(), "sigmas");
    assert_close(&s.timesteps, out.get("timesteps").unwrap(), "timesteps");
    let s = flow_match_schedule(28, 3.0).unwrap();
    assert_close(&s.sigmas, out.get("sigmas_28").unwrap(), "sigmas_28");
    assert_close(
        &s.timesteps,
        out.get("timesteps_28").unwrap(),
        "timesteps_28",
    );
}

#[test]
fn schedule_rejects_bad_arguments() {
    assert!(flow_match_schedule(0, 3.0).is_err());
    assert!(flow_match_schedule(4, 0.0).is_err());
    assert!(flow_match_schedule(4, f64::NAN).is_err());
    let one = flow_match_schedule(1, 3.0).unwrap();
    assert_eq!(one.sigmas, vec![1.0, 0.0]);
}

fn run_sampler(guidance: Option<f32>) -> Tensor {
    let model = Mmdit::load(fixture("sd35")).unwrap();
    let inp = TensorFile::open(fixture("sd35/sample_inputs.safetensors")).unwrap();
    let cond = Conditioning {
        encoder_hidden_states: inp.get("encoder_hidden_states").unwrap(),
        pooled_projections: inp.get("pooled_projections").unwrap(),
        negative_encoder_hidden_states: Some(inp.get("negative_encoder_hidden_states").unwrap()),
        negative_pooled_projections: Some(inp.get("negative_pooled_projections").unwrap()),
    };
    let opts = SampleOptions {
        steps: 4,
        shift: 3.0,
        guidance,
    };
    let mut calls = Vec::new();
    let out = sample(
        &model,
        inp.get("latent_init").unwrap().clone(),
        &cond,
        &opts,
        |i, n, s| calls.push((i, n, s)),
    )
    .unwrap();
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[0], (0, 4, 1.0));
    out
}

#[test]
fn sampling_matches_diffusers() {
    let got = run_sampler(None);
    let err = rel_err(&got, outputs().get("latent_final").unwrap());
    eprintln!("latent_final: max|err|/max|ref| = {err:.3e}");
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn guided_sampling_matches_diffusers() {
    let got = run_sampler(Some(4.5));
    let err = rel_err(&got, outputs().get("latent_final_cfg").unwrap());
    eprintln!("latent_final_cfg: max|err|/max|ref| = {err:.3e}");
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn guidance_without_negative_prompt_is_an_error() {
    let model = Mmdit::load(fixture("sd35")).unwrap();
    let inp = TensorFile::open(fixture("sd35/sample_inputs.safetensors")).unwrap();
    let cond = Conditioning {
        encoder_hidden_states: inp.get("encoder_hidden_states").unwrap(),
        pooled_projections: inp.get("pooled_projections").unwrap(),
        negative_encoder_hidden_states: None,
        negative_pooled_projections: None,
    };
    let opts = SampleOptions {
        steps: 2,
        shift: 3.0,
        guidance: Some(2.0),
    };
    let err = sample(
        &model,
        inp.get("latent_init").unwrap().clone(),
        &cond,
        &opts,
        |_, _, _| {},
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("negative_encoder_hidden_states"),
        "{err}"
    );
}

#[test]
fn seeded_latent_is_reproducible_and_normal() {
    let a = initial_latent(vec![1, 4, 33, 17], 7).unwrap();
    let b = initial_latent(vec![1, 4, 33, 17], 7).unwrap();
    let c = initial_latent(vec![1, 4, 33, 17], 8).unwrap();
    assert!(
        initial_latent(vec![1 << 20, 16, 1 << 20, 1 << 20], 0).is_err(),
        "overflowing shape"
    );
    assert!(
        initial_latent(vec![1, 16, 8192, 8192], 0).is_err(),
        "over the cap"
    );
    assert_eq!(a, b);
    assert_ne!(a, c);
    let n = a.data.len() as f64;
    let mean = a.data.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = a
        .data
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    assert!(
        mean.abs() < 0.1 && (var - 1.0).abs() < 0.1,
        "mean {mean} var {var}"
    );
}
