//! Sub-component cuts recorded in packages: `compress` writes a plan's removed
//! sub-components into the manifest and leaves their tensors out, the package runs
//! exactly as the run-time mask does (against diffusers' outputs), and the planner
//! checks and proposes them.

mod common;

use std::collections::BTreeMap;

use common::{fixture, forward_on_fixture_inputs, rel_err};
use hiprune::compress::{
    AnalyzeOptions, CompressOptions, PlanOptions, PlanTarget, WeightFormat, analyze_model,
    compress_checkpoint, make_plan,
};
use hiprune::format::ComponentCut;
use hiprune::model::{BlockMask, Mmdit, PruneSpec, TensorFile};
use hiprune::{Error, Package};

fn mask(names: &[&str]) -> BlockMask {
    let mut m = BlockMask::default();
    for n in names {
        m.remove(n).unwrap();
    }
    m
}

#[test]
fn packages_with_component_cuts_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    for (folder, block, component, output) in [
        ("sd35", 2, "ff_context", "output_no_ff_context_2"),
        ("mmditx", 2, "ff_context", "output_no_ff_context_2"),
        ("mmditx", 1, "norm1", "output_no_norm1_1"),
    ] {
        let hpk = dir.path().join(format!("{folder}-{component}.hpk"));
        let mut spec = PruneSpec::none();
        spec.remove_component(block, component).unwrap();
        let opts = CompressOptions {
            weights: WeightFormat::F32,
            spec,
            ..CompressOptions::default()
        };
        compress_checkpoint(&fixture(folder), &hpk, &opts, &mut |_| {}).unwrap();
        let package = Package::open(&hpk).unwrap();
        assert_eq!(
            package.manifest().removed_components,
            vec![ComponentCut {
                block: block as u32,
                components: vec![component.to_string()],
            }]
        );
        let prefix = match component {
            "norm1" => format!("transformer_blocks.{block}.norm1."),
            _ => format!("transformer_blocks.{block}.{component}."),
        };
        assert!(
            package.tensor_names().all(|t| !t.starts_with(&prefix)),
            "{folder}: the removed {component} is not stored"
        );
        let model = Mmdit::load(&hpk).unwrap();
        assert_eq!(model.prune_spec().mask(block), mask(&[component]));
        let want = TensorFile::open(fixture(folder).join("outputs.safetensors")).unwrap();
        let err = rel_err(
            &forward_on_fixture_inputs(&model, folder),
            want.get(output).unwrap(),
        );
        eprintln!("{folder} package without {block}.{component}: {err:.3e}");
        assert!(err <= 1e-4, "{folder}/{output}: {err:.3e}");
    }
}

#[test]
fn attn2_cuts_only_exist_in_dual_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = PruneSpec::none();
    spec.remove_component(1, "attn2").unwrap();
    let opts = CompressOptions {
        weights: WeightFormat::F32,
        spec: spec.clone(),
        ..CompressOptions::default()
    };
    let ok = dir.path().join("x.hpk");
    compress_checkpoint(&fixture("mmditx"), &ok, &opts, &mut |_| {}).unwrap();
    let model = Mmdit::load(&ok).unwrap();
    assert!(model.prune_spec().mask(1).attn2);
    let out = dir.path().join("sd35.hpk");
    let err = compress_checkpoint(&fixture("sd35"), &out, &opts, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("attn2"), "{err}");
    assert!(!out.exists());
}

#[test]
fn removal_lists_parse_blocks_and_components() {
    let spec = PruneSpec::parse_removals("25, 12.ff,14.attn2,12.norm1").unwrap();
    assert_eq!(
        spec.removed_blocks.into_iter().collect::<Vec<_>>(),
        vec![25]
    );
    assert_eq!(spec.masks[&12], mask(&["ff", "norm1"]));
    assert_eq!(spec.masks[&14], mask(&["attn2"]));
    for bad in ["x", "12.", "12.mlp", ".ff", "-1"] {
        let err = PruneSpec::parse_removals(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{bad}: {err}");
    }
}

#[test]
fn the_planner_checks_and_proposes_component_cuts() {
    let cfg = hiprune::model::MmditConfig::sd35_large();
    let plan = |cuts: BTreeMap<usize, BlockMask>, protect: Option<usize>| {
        make_plan(
            &cfg,
            None,
            &PlanOptions {
                target: PlanTarget::Preset("sd35-large-turbo".into()),
                protect_until: protect,
                remove_components: cuts,
                ..PlanOptions::default()
            },
        )
    };
    let ok = plan(BTreeMap::from([(30, mask(&["ff"]))]), None).unwrap();
    assert_eq!(
        ok.compress_options(CompressOptions::default())
            .spec
            .mask(30),
        mask(&["ff"])
    );
    assert!(ok.summary.contains("30.ff"), "{}", ok.summary);
    assert!(ok.estimated_bytes < plan(BTreeMap::new(), None).unwrap().estimated_bytes);
    for (cuts, protect, needle) in [
        (BTreeMap::from([(26, mask(&["ff"]))]), None, "removed whole"),
        (BTreeMap::from([(30, mask(&["attn2"]))]), None, "attn2"),
        (BTreeMap::from([(10, mask(&["ff"]))]), Some(20), "protected"),
    ] {
        let err = plan(cuts, protect).unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }

    // Proposals from a measured report: each cheaper than the costliest removed block,
    // cheapest first, none in a removed block.
    let mut model = Mmdit::load(fixture("sd35")).unwrap();
    let report = analyze_model(
        &mut model,
        "sd35",
        None,
        &AnalyzeOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let small = model.config().clone();
    let plan = make_plan(
        &small,
        Some(&report),
        &PlanOptions {
            target: PlanTarget::Remove([2].into()),
            ..PlanOptions::default()
        },
    )
    .unwrap();
    let threshold = plan.sensitivity[2];
    let score = |entry: &str| {
        let (b, c) = entry.split_once('.').unwrap();
        let b: usize = b.parse().unwrap();
        report
            .blocks
            .iter()
            .find(|s| s.block == b)
            .unwrap()
            .components
            .iter()
            .find(|s| s.component == c)
            .unwrap()
            .rel_l2
    };
    eprintln!("proposed: {:?}", plan.proposed_components);
    assert!(
        !plan.proposed_components.is_empty(),
        "some component is cheaper than a block"
    );
    let scores: Vec<f32> = plan.proposed_components.iter().map(|e| score(e)).collect();
    assert!(scores.windows(2).all(|w| w[0] <= w[1]), "{scores:?}");
    assert!(scores.iter().all(|&s| s <= threshold));
    assert!(
        plan.proposed_components
            .iter()
            .all(|e| !e.starts_with("2."))
    );
}
