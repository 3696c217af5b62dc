//! The CPU forward pass against diffusers' outputs for the fixture models
//! (tests/fixtures/mmdit): full, sharded, f16, MMDiT-X, pruned and sub-component-removed.

mod common;

use common::{fixture, forward_on_fixture_inputs, rel_err};

use hiprune::model::{Mmdit, MmditInputs, PruneSpec, Tensor, TensorFile};

const TOL: f32 = 1e-4;

fn check(folder: &str, spec: PruneSpec, output: &str) {
    let mut model = Mmdit::load(fixture(folder)).unwrap();
    model.set_prune(spec).unwrap();
    let got = forward_on_fixture_inputs(&model, folder);
    let outputs = TensorFile::open(fixture(folder).join("outputs.safetensors")).unwrap();
    let want = outputs.get(output).unwrap();
    let err = rel_err(&got, want);
    eprintln!("{folder}/{output}: max|err|/max|ref| = {err:.3e}");
    assert!(
        err <= TOL,
        "{folder}/{output}: relative error {err:.3e} > {TOL:e}"
    );
}

#[test]
fn sd3_matches_diffusers() {
    check("sd3", PruneSpec::none(), "output");
}

#[test]
fn sd35_matches_diffusers() {
    check("sd35", PruneSpec::none(), "output");
}

#[test]
fn sd35_sharded_matches_diffusers() {
    check("sd35_sharded", PruneSpec::none(), "output");
}

#[test]
fn sd3_f16_matches_diffusers() {
    check("sd3_f16", PruneSpec::none(), "output");
}

#[test]
fn mmditx_matches_diffusers() {
    check("mmditx", PruneSpec::none(), "output");
}

#[test]
fn removed_block_1_matches_diffusers() {
    check("sd35", PruneSpec::remove_blocks([1]), "output_removed_1");
    check("mmditx", PruneSpec::remove_blocks([1]), "output_removed_1");
}

#[test]
fn removed_last_block_matches_diffusers() {
    check("sd35", PruneSpec::remove_blocks([3]), "output_removed_last");
}

#[test]
fn removed_ff_context_matches_diffusers() {
    for folder in ["sd35", "mmditx"] {
        let mut spec = PruneSpec::none();
        spec.remove_component(2, "ff_context").unwrap();
        check(folder, spec, "output_no_ff_context_2");
    }
}

#[test]
fn removed_norm1_matches_diffusers() {
    for folder in ["sd35", "mmditx"] {
        let mut spec = PruneSpec::none();
        spec.remove_component(1, "norm1").unwrap();
        check(folder, spec, "output_no_norm1_1");
    }
}

#[test]
fn removal_changes_the_output() {
    let model = Mmdit::load(fixture("sd35")).unwrap();
    let full = forward_on_fixture_inputs(&model, "sd35");
    for comp in ["norm1_context", "attn", "ff"] {
        let mut m = Mmdit::load(fixture("sd35")).unwrap();
        let mut spec = PruneSpec::none();
        spec.remove_component(1, comp).unwrap();
        m.set_prune(spec).unwrap();
        let out = forward_on_fixture_inputs(&m, "sd35");
        assert!(
            rel_err(&out, &full) > 1e-3,
            "removing {comp} changed nothing"
        );
    }
}

#[test]
fn batch_items_are_independent() {
    // Running item 1 alone gives the same result as inside the batch of 2.
    let model = Mmdit::load(fixture("mmditx")).unwrap();
    let full = forward_on_fixture_inputs(&model, "mmditx");
    let inputs = TensorFile::open(fixture("mmditx").join("inputs.safetensors")).unwrap();
    let item = |t: &Tensor| {
        let per = t.data.len() / t.shape[0];
        let mut shape = t.shape.clone();
        shape[0] = 1;
        Tensor::new(t.data[per..].to_vec(), shape).unwrap()
    };
    let one = model
        .forward(&MmditInputs {
            hidden_states: &item(inputs.get("hidden_states").unwrap()),
            encoder_hidden_states: &item(inputs.get("encoder_hidden_states").unwrap()),
            pooled_projections: &item(inputs.get("pooled_projections").unwrap()),
            timestep: &item(inputs.get("timestep").unwrap()),
        })
        .unwrap();
    let want = item(&full);
    assert!(rel_err(&one, &want) <= 1e-5);
}
