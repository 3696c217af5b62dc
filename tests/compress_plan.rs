//! `make_plan`: presets, targets, the protected range, determinism and the
//! distillation weights.

use std::collections::BTreeSet;

use hiprune::Error;
use hiprune::compress::plan::estimate_bytes;
use hiprune::compress::{
    BlockScores, PlanOptions, PlanTarget, ProtectPrecision, SensitivityReport, WeightFormat,
    make_plan,
};
use hiprune::model::{MmditConfig, PruneSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn report(sens: &[f32]) -> SensitivityReport {
    SensitivityReport {
        model: "test".into(),
        num_layers: sens.len(),
        inputs: "synthetic".into(),
        synthetic_inputs: true,
        num_inputs: 1,
        blocks: sens
            .iter()
            .enumerate()
            .map(|(i, &s)| BlockScores {
                block: i,
                rel_l2: Some(s),
                cos_dist: Some(s / 2.0),
                influence: None,
                weight_score: 0.0,
                components: Vec::new(),
            })
            .collect(),
    }
}

fn config(layers: usize) -> MmditConfig {
    let mut c = MmditConfig::sd35_large();
    c.num_layers = layers;
    c
}

#[test]
fn presets_remove_the_published_blocks() {
    let p = make_plan(
        &MmditConfig::sd35_large(),
        None,
        &PlanOptions {
            target: PlanTarget::Preset("sd35-large-turbo".into()),
            ..PlanOptions::default()
        },
    )
    .unwrap();
    assert_eq!(p.removed_blocks, vec![25, 26, 27, 28, 31, 32, 33, 34]);
    assert_eq!(p.kept_blocks.len(), 30);
    assert_eq!(p.protect_until, 25);
    assert!(p.freeze[..25].iter().all(|&f| f) && !p.freeze[25..].iter().any(|&f| f));
    assert!(p.estimated_bytes < p.dense_f16_bytes / 4);

    let m = make_plan(
        &MmditConfig::sd35_medium(),
        None,
        &PlanOptions {
            target: PlanTarget::Preset("sd35-medium".into()),
            ..PlanOptions::default()
        },
    )
    .unwrap();
    assert_eq!(m.removed_blocks, vec![13, 15, 16, 18, 20, 21]);
    // Every dual-attention block (0-12) is kept.
    assert!((0..13).all(|i| m.kept_blocks.contains(&i)));

    // A preset for the wrong model is refused.
    let e = make_plan(
        &MmditConfig::sd35_medium(),
        None,
        &PlanOptions {
            target: PlanTarget::Preset("sd35-large-turbo".into()),
            ..PlanOptions::default()
        },
    );
    assert!(matches!(e, Err(Error::InvalidArgument { .. })));
}

/// The released HierarchicalPrune scripts give the cuts as `CUT_BLOCKS` strings, and
/// their parser turns `a-b` into Python's `range(a, b)`: the end is exclusive.
fn released_cut(cut_blocks: &str) -> Vec<usize> {
    cut_blocks
        .split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![part.parse().unwrap()],
        })
        .collect()
}

#[test]
fn presets_equal_what_the_released_scripts_remove() {
    for (cfg, preset, cut_blocks, remaining) in [
        (
            MmditConfig::sd35_large(),
            "sd35-large-turbo",
            "25-29,31-35",
            30,
        ),
        (
            MmditConfig::sd35_medium(),
            "sd35-medium",
            "13,15,16,18,20,21",
            18,
        ),
    ] {
        let p = make_plan(
            &cfg,
            None,
            &PlanOptions {
                target: PlanTarget::Preset(preset.into()),
                ..PlanOptions::default()
            },
        )
        .unwrap();
        assert_eq!(p.removed_blocks, released_cut(cut_blocks), "{preset}");
        assert_eq!(p.kept_blocks.len(), remaining, "{preset}");
    }
}

#[test]
fn the_protected_range_and_the_last_block_are_never_pruned() {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..40 {
        let l = rng.random_range(3..40);
        let k = rng.random_range(0..l - 1);
        let sens: Vec<f32> = (0..l).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let candidates = l - 1 - k;
        let keep = l - rng.random_range(0..=candidates);
        let opts = PlanOptions {
            target: PlanTarget::Blocks(keep),
            protect_until: Some(k),
            position_weight: rng.random_range(0.0f32..1.0),
            ..PlanOptions::default()
        };
        let cfg = config(l);
        let r = report(&sens);
        let p = make_plan(&cfg, Some(&r), &opts).unwrap();
        assert_eq!(p.kept_blocks.len(), keep);
        assert!(
            p.removed_blocks.iter().all(|&b| b >= k && b + 1 < l),
            "{p:?}"
        );
        assert!(p.protect_until >= k);
        // Deterministic.
        assert_eq!(make_plan(&cfg, Some(&r), &opts).unwrap(), p);
        // One block more than the candidates is impossible.
        if candidates + 1 < l {
            let e = make_plan(
                &cfg,
                Some(&r),
                &PlanOptions {
                    target: PlanTarget::Blocks(l - candidates - 1),
                    ..opts.clone()
                },
            );
            match e {
                Err(Error::InvalidArgument { what, reason }) => {
                    assert_eq!(what, "plan target");
                    assert!(reason.contains("cannot be met"), "{reason}");
                }
                other => panic!("expected an impossible-target error, got {other:?}"),
            }
        }
    }
    // An explicit list may not reach into the protected range, but may take the last
    // block.
    let e = make_plan(
        &config(10),
        None,
        &PlanOptions {
            target: PlanTarget::Remove([3, 8].into_iter().collect()),
            protect_until: Some(5),
            ..PlanOptions::default()
        },
    );
    assert!(matches!(e, Err(Error::InvalidArgument { .. })));
    let p = make_plan(
        &config(10),
        None,
        &PlanOptions {
            target: PlanTarget::Remove([9].into_iter().collect()),
            ..PlanOptions::default()
        },
    )
    .unwrap();
    assert_eq!(p.removed_blocks, vec![9]);
}

#[test]
fn sensitivity_and_prior_decide_the_order() {
    // Block 2 is the least sensitive; later blocks are cheaper under the prior.
    let sens = [0.9, 0.8, 0.05, 0.7, 0.6, 0.5, 0.4, 0.3];
    let cfg = config(8);
    let r = report(&sens);
    let measured = make_plan(
        &cfg,
        Some(&r),
        &PlanOptions {
            target: PlanTarget::Blocks(7),
            position_weight: 0.0,
            ..PlanOptions::default()
        },
    )
    .unwrap();
    assert_eq!(measured.removed_blocks, vec![2]);
    assert_eq!(measured.protect_until, 2);
    let prior = make_plan(
        &cfg,
        Some(&r),
        &PlanOptions {
            target: PlanTarget::Blocks(6),
            position_weight: 1.0,
            ..PlanOptions::default()
        },
    )
    .unwrap();
    // Position only: the latest blocks before the last one.
    assert_eq!(prior.removed_blocks, vec![5, 6]);
    let none = make_plan(
        &cfg,
        None,
        &PlanOptions {
            target: PlanTarget::Blocks(6),
            ..PlanOptions::default()
        },
    )
    .unwrap();
    assert_eq!(none.removed_blocks, vec![5, 6]);
    assert!(none.summary.contains("positional prior only"));
    assert!(none.distillation_weights[7] == 1.0);
}

#[test]
fn distillation_weights_are_inverse_to_sensitivity() {
    let sens = [0.9, 0.8, 0.7, 0.1, 0.6, 0.2, 0.4, 0.3, 0.5, 0.35];
    let cfg = config(10);
    let p = make_plan(
        &cfg,
        Some(&report(&sens)),
        &PlanOptions {
            target: PlanTarget::Remove([3].into_iter().collect()),
            ..PlanOptions::default()
        },
    )
    .unwrap();
    // Protected 0..3 and removed 3 get 0; the others are ordered inversely.
    assert!(p.distillation_weights[..4].iter().all(|&w| w == 0.0));
    let trainable: Vec<usize> = (4..10).collect();
    let mean: f32 = trainable
        .iter()
        .map(|&i| p.distillation_weights[i])
        .sum::<f32>()
        / trainable.len() as f32;
    assert!((mean - 1.0).abs() < 1e-4, "mean {mean}");
    for &a in &trainable {
        for &b in &trainable {
            if sens[a] < sens[b] {
                assert!(p.distillation_weights[a] > p.distillation_weights[b]);
            }
        }
    }
    let json = p.to_json().unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["freeze"].as_array().unwrap().len(), 10);
    assert!(v["removal_cost"][9].is_null()); // the last block: not a candidate
    assert!(v["removal_cost"][5].is_number());
}

#[test]
fn byte_and_ratio_targets_are_met() {
    let cfg = MmditConfig::sd35_large();
    let p = make_plan(
        &cfg,
        None,
        &PlanOptions {
            target: PlanTarget::Ratio(0.21),
            ..PlanOptions::default()
        },
    )
    .unwrap();
    assert!(p.estimated_bytes as f64 <= 0.21 * p.dense_f16_bytes as f64);
    // Minimal: keeping the last removed block would miss the target.
    let mut fewer: BTreeSet<usize> = p.removed_blocks.iter().copied().collect();
    let first = *fewer.iter().next().unwrap();
    fewer.remove(&first);
    let est = estimate_bytes(
        &cfg,
        &PruneSpec::remove_blocks(fewer),
        WeightFormat::Int4,
        64,
        &BTreeSet::new(),
    );
    assert!(est as f64 > 0.21 * p.dense_f16_bytes as f64);

    let budget = p.dense_f16_bytes / 5;
    let b = make_plan(
        &cfg,
        None,
        &PlanOptions {
            target: PlanTarget::Bytes(budget),
            protect_precision: ProtectPrecision::F16,
            protect_until: Some(4),
            ..PlanOptions::default()
        },
    )
    .unwrap();
    assert!(b.estimated_bytes <= budget);
    assert!(b.removed_blocks.iter().all(|&i| i >= 4));
    let impossible = make_plan(
        &cfg,
        None,
        &PlanOptions {
            target: PlanTarget::Bytes(1000),
            ..PlanOptions::default()
        },
    );
    assert!(matches!(impossible, Err(Error::InvalidArgument { .. })));
}
