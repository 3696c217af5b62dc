//! [`make_plan`]: which blocks to remove, which to protect, and how hard to distil the
//! rest (HierarchicalPrune's three parts).
//!
//! **Hierarchical Position Pruning.** Each candidate block gets a removal cost
//! `(1 - w) * s_i + w * p_i`, where `s_i` is its measured sensitivity scaled to the
//! model's maximum (from a [`SensitivityReport`]) and `p_i = 1 - i / (L - 1)` a positional
//! prior that makes early blocks (which set layout and semantics in MMDiT models)
//! costlier to remove; `w` is [`PlanOptions::position_weight`]. The prior is a tunable
//! weight, not a rule: in other models the last layers can matter most, and with
//! `w = 0` only the measurements count. Without a report the prior alone orders the
//! blocks. Blocks are removed cheapest first until the target is met.
//!
//! **The last block is never removed by the planner** (only by an explicit list): the
//! engine can run without it (the last kept block's context update is then discarded),
//! but it is the block that holds `context_pre_only` (the final context
//! AdaLayerNormContinuous) and feeds `norm_out`/`proj_out` directly, so removing it
//! changes the output head's input distribution more than removing a middle block.
//!
//! **Positional Weight Preservation.** Blocks before the first removed block are
//! protected: never removed (with `--protect-until K` the boundary is at least `K`
//! before planning), frozen during distillation (`freeze`), and kept in f16 when
//! [`ProtectPrecision::F16`] is asked.
//!
//! **Sensitivity-Guided Distillation.** Each trainable kept block gets a weight
//! inversely proportional to its sensitivity, normalised to a mean of 1 over the
//! trainable blocks (1 for all of them when nothing was measured); protected and
//! removed blocks get 0. The binary form the reference code uses is `freeze`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::compress::quantize::{CompressOptions, WeightFormat};
use crate::compress::report::SensitivityReport;
use crate::error::{Error, Result};
use crate::model::layout::{Required, required_tensors};
use crate::model::weights::POS_TABLE;
use crate::model::{BlockMask, MmditConfig, PruneSpec};

/// What the plan must reach.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanTarget {
    /// Nothing removed.
    None,
    /// Keep at most this many blocks.
    Blocks(usize),
    /// Estimated package size at most this many bytes.
    Bytes(u64),
    /// Estimated package size at most this fraction of the unpruned model in f16.
    Ratio(f64),
    /// Remove exactly these blocks (the last block may be among them).
    Remove(BTreeSet<usize>),
    /// A published cut, as the released HierarchicalPrune scripts remove it (their
    /// `CUT_BLOCKS="25-29,31-35"` is read as end-exclusive ranges):
    /// `sd35-large-turbo` (blocks 25-28 and 31-34 of 38, 30 remain) or
    /// `sd35-medium` (13, 15, 16, 18, 20, 21 of 24, 18 remain).
    Preset(String),
}

/// Precision of the protected blocks' Linear weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProtectPrecision {
    /// Same as every other block.
    Int4,
    /// Kept in f16.
    F16,
}

/// Settings of [`make_plan`].
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// The target.
    pub target: PlanTarget,
    /// Blocks `0..K` are never removed.
    pub protect_until: Option<usize>,
    /// Precision of the protected blocks.
    pub protect_precision: ProtectPrecision,
    /// Weight `w` of the positional prior in the removal cost, in `[0, 1]`.
    pub position_weight: f32,
    /// Weight storage assumed by the size estimates.
    pub weights: WeightFormat,
    /// Group size assumed by the size estimates.
    pub group: usize,
    /// Whether the package will compute the positional table instead of storing it
    /// (see [`pos_table_is_sincos`](crate::compress::quantize::pos_table_is_sincos)):
    /// the estimates then count it as 0 bytes. `false` counts it as stored, which
    /// overestimates a package that computes it by the table's size (about 170 MiB in
    /// f16 for SD3.5 Large, 430 MiB for SD3.5 Medium).
    pub pos_table_computed: bool,
    /// Blocks the checkpoint already lacks (a pruned single file): every target counts
    /// them as removed, and the protected range does not apply to them.
    pub absent_blocks: BTreeSet<usize>,
    /// Sub-components to remove from blocks the plan keeps (`--remove 12.ff`): added to
    /// every target; none may be in a removed or protected block.
    pub remove_components: BTreeMap<usize, BlockMask>,
}

impl Default for PlanOptions {
    /// No target, no protection, prior weight 0.3, INT4 g64, the positional table
    /// counted as stored.
    fn default() -> Self {
        PlanOptions {
            target: PlanTarget::None,
            protect_until: None,
            protect_precision: ProtectPrecision::Int4,
            position_weight: 0.3,
            weights: WeightFormat::Int4,
            group: 64,
            pos_table_computed: false,
            absent_blocks: BTreeSet::new(),
            remove_components: BTreeMap::new(),
        }
    }
}

/// A pruning plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Blocks of the model.
    pub num_layers: usize,
    /// Removed blocks (original indices).
    pub removed_blocks: Vec<usize>,
    /// Kept blocks, in execution order.
    pub kept_blocks: Vec<usize>,
    /// Blocks `0..protect_until` are protected (frozen, never removed).
    pub protect_until: usize,
    /// Precision of the protected blocks.
    pub protect_precision: ProtectPrecision,
    /// Sub-components removed from kept blocks (original index to mask).
    pub removed_components: BTreeMap<usize, BlockMask>,
    /// Sub-component cuts the report suggests (`12.ff` entries for `--remove`): in
    /// kept, unprotected blocks, measured to change the output less than the costliest
    /// block the plan removes, cheapest first. Empty without a report.
    pub proposed_components: Vec<String>,
    /// Measured sensitivity per block (empty when no report was given).
    pub sensitivity: Vec<f32>,
    /// Removal cost per block (sensitivity and prior combined; `inf` = not a candidate).
    pub removal_cost: Vec<f32>,
    /// Distillation weight per block (0 for removed and protected blocks).
    pub distillation_weights: Vec<f32>,
    /// Whether each block is frozen during distillation.
    pub freeze: Vec<bool>,
    /// Estimated package bytes.
    pub estimated_bytes: u64,
    /// Bytes of the unpruned model in f16, for comparison.
    pub dense_f16_bytes: u64,
    /// One-line human summary.
    pub summary: String,
}

/// The published cuts: the released scripts' `CUT_BLOCKS` strings (`25-29,31-35` for
/// SD3.5 Large Turbo, `13,15,16,18,20,21` for Medium) as their parser reads them, a
/// range `a-b` being Python's `range(a, b)` (end exclusive; the parser's own comment
/// says inclusive, its code does not).
fn preset_blocks(name: &str, cfg: &MmditConfig) -> Result<BTreeSet<usize>> {
    let (layers, blocks): (usize, Vec<usize>) = match name {
        "sd35-large-turbo" | "sd35-large" => (38, (25..29).chain(31..35).collect()),
        "sd35-medium" => (24, vec![13, 15, 16, 18, 20, 21]),
        other => {
            return Err(Error::invalid(
                "plan preset",
                format!("`{other}` is not one of sd35-large-turbo, sd35-medium"),
            ));
        }
    };
    if cfg.num_layers != layers {
        return Err(Error::invalid(
            "plan preset",
            format!(
                "`{name}` is for {layers}-block models, this one has {}",
                cfg.num_layers
            ),
        ));
    }
    Ok(blocks.into_iter().collect())
}

/// Estimated package bytes of `cfg` under `spec`, the positional table counted as
/// stored (see [`estimate_package_bytes`]).
pub fn estimate_bytes(
    cfg: &MmditConfig,
    spec: &PruneSpec,
    weights: WeightFormat,
    group: usize,
    dense_blocks: &BTreeSet<usize>,
) -> u64 {
    estimate_package_bytes(cfg, spec, weights, group, dense_blocks, false)
}

/// Estimated package bytes of `cfg` under `spec`: the Linear weights in `weights`
/// (f16 for `dense_blocks` and where `group` does not divide K), f32 biases, the other
/// tensors in f16 (f32 for [`WeightFormat::F32`]), and the positional table as 0 bytes
/// when `pos_table_computed` (the package computes it at load).
pub fn estimate_package_bytes(
    cfg: &MmditConfig,
    spec: &PruneSpec,
    weights: WeightFormat,
    group: usize,
    dense_blocks: &BTreeSet<usize>,
    pos_table_computed: bool,
) -> u64 {
    let plain_elem = if weights == WeightFormat::F32 { 4 } else { 2 };
    required_tensors(cfg, spec)
        .iter()
        .map(|r| match r {
            Required::Linear { name, n, k } => {
                let block = name
                    .strip_prefix("transformer_blocks.")
                    .and_then(|s| s.split('.').next())
                    .and_then(|s| s.parse::<usize>().ok());
                let fmt = match block {
                    Some(b) if dense_blocks.contains(&b) && weights.q4_kind().is_some() => {
                        WeightFormat::F16
                    }
                    _ => weights,
                };
                fmt.linear_bytes(*n, *k, group) + 4 * *n as u64
            }
            Required::Plain { name, .. } if pos_table_computed && name == POS_TABLE => 0,
            Required::Plain { shape, .. } => plain_elem * shape.iter().product::<usize>() as u64,
        })
        .sum()
}

/// Makes a plan for `cfg` from an optional sensitivity report. Deterministic: the same
/// inputs give the same plan. Errors: an index outside the model, a removal inside the
/// protected range, a preset for another model, or a target that cannot be met
/// without touching the protected range or the last block. Errors name the
/// [`PlanOptions`] field at fault (`protect_until`, `target_blocks`, ...), not a flag.
pub fn make_plan(
    cfg: &MmditConfig,
    report: Option<&SensitivityReport>,
    opts: &PlanOptions,
) -> Result<Plan> {
    let sensitivity = check_options(cfg, report, opts)?;
    let l = cfg.num_layers;
    let protect_floor = opts.protect_until.unwrap_or(0);
    let removal_cost = removal_costs(l, &sensitivity, protect_floor, opts.position_weight);
    let dense_f16_bytes = estimate_bytes(
        cfg,
        &PruneSpec::none(),
        WeightFormat::F16,
        64,
        &BTreeSet::new(),
    );
    let search = Search {
        cfg,
        opts,
        protect_floor,
        removal_cost: &removal_cost,
    };
    let removed: BTreeSet<usize> = match &opts.target {
        PlanTarget::None => opts.absent_blocks.clone(),
        PlanTarget::Remove(set) => search.explicit(set.clone())?,
        PlanTarget::Preset(name) => search.explicit(preset_blocks(name, cfg)?)?,
        PlanTarget::Blocks(n) => search.greedy(&|r| l - r.len() <= *n, &format!("{n} blocks"))?,
        PlanTarget::Bytes(b) => {
            search.greedy(&|r| search.estimate(r) <= *b, &format!("{b} bytes"))?
        }
        PlanTarget::Ratio(x) => {
            let cap = (*x * dense_f16_bytes as f64) as u64;
            search.greedy(&|r| search.estimate(r) <= cap, &format!("ratio {x}"))?
        }
    };

    // The protected (frozen) range ends at the first block anything is removed from.
    let first_cut = removed
        .iter()
        .chain(opts.remove_components.keys())
        .min()
        .copied();
    let protect_until = first_cut.map_or(protect_floor, |f| f.max(protect_floor));
    let kept: Vec<usize> = (0..l).filter(|i| !removed.contains(i)).collect();
    check_component_cuts(cfg, &opts.remove_components, &removed, protect_floor)?;
    let freeze: Vec<bool> = (0..l).map(|i| i < protect_until).collect();
    let distillation_weights = distillation_weights(&kept, &freeze, &sensitivity);
    let dense = dense_blocks_for(l, &removed, protect_until, opts.protect_precision);
    let spec = PruneSpec {
        removed_blocks: removed.clone(),
        masks: opts.remove_components.clone(),
    };
    let proposed_components = report.map_or_else(Vec::new, |r| {
        propose_components(
            r,
            &removed,
            &opts.remove_components,
            protect_until,
            &sensitivity,
        )
    });
    let estimated_bytes = estimate_package_bytes(
        cfg,
        &spec,
        opts.weights,
        opts.group,
        &dense,
        opts.pos_table_computed,
    );
    let removed_blocks: Vec<usize> = removed.into_iter().collect();
    let summary = summary(
        opts,
        !sensitivity.is_empty(),
        &removed_blocks,
        &spec,
        kept.len(),
        l,
        protect_until,
        estimated_bytes,
        dense_f16_bytes,
    );
    Ok(Plan {
        num_layers: l,
        removed_blocks,
        kept_blocks: kept,
        protect_until,
        protect_precision: opts.protect_precision,
        removed_components: opts.remove_components.clone(),
        proposed_components,
        sensitivity,
        removal_cost,
        distillation_weights,
        freeze,
        estimated_bytes,
        dense_f16_bytes,
        summary,
    })
}

/// Checks the options against the model and the report; returns the report's
/// sensitivity per block (empty without a report).
fn check_options(
    cfg: &MmditConfig,
    report: Option<&SensitivityReport>,
    opts: &PlanOptions,
) -> Result<Vec<f32>> {
    cfg.validate()?;
    let l = cfg.num_layers;
    if !(0.0..=1.0).contains(&opts.position_weight) {
        return Err(Error::invalid(
            "position_weight",
            format!("{} is outside [0, 1]", opts.position_weight),
        ));
    }
    if let Some(k) = opts.protect_until
        && k > l
    {
        return Err(Error::invalid(
            "protect_until",
            format!("{k} is beyond the model's {l} blocks"),
        ));
    }
    match opts.target {
        PlanTarget::Blocks(n) if n == 0 || n > l => {
            return Err(Error::invalid(
                "target_blocks",
                format!("{n} is not between 1 and the model's {l} blocks"),
            ));
        }
        PlanTarget::Ratio(x) if !(x.is_finite() && x > 0.0) => {
            return Err(Error::invalid(
                "target_ratio",
                format!("{x} must be positive"),
            ));
        }
        _ => {}
    }
    match report {
        Some(r) if r.num_layers != l => Err(Error::invalid(
            "sensitivity report",
            format!("is for {} blocks, the model has {l}", r.num_layers),
        )),
        Some(r) => Ok(r.sensitivity()),
        None => Ok(Vec::new()),
    }
}

/// Removal cost per block: the measured sensitivity (scaled to its maximum) blended
/// with the positional prior `1 - i / (l - 1)` by weight `w`; the prior alone without
/// a sensitivity. Protected blocks and the last block cost `inf` (never candidates).
fn removal_costs(l: usize, sensitivity: &[f32], protect_floor: usize, w: f32) -> Vec<f32> {
    let max_s = sensitivity.iter().copied().fold(0.0f32, f32::max);
    (0..l)
        .map(|i| {
            if i < protect_floor || i + 1 == l {
                return f32::INFINITY;
            }
            let prior = if l > 1 {
                1.0 - i as f32 / (l - 1) as f32
            } else {
                1.0
            };
            if sensitivity.is_empty() || max_s <= 0.0 {
                prior
            } else {
                (1.0 - w) * sensitivity[i] / max_s + w * prior
            }
        })
        .collect()
}

/// What the searches for removed blocks share.
struct Search<'a> {
    cfg: &'a MmditConfig,
    opts: &'a PlanOptions,
    protect_floor: usize,
    removal_cost: &'a [f32],
}

impl Search<'_> {
    /// Estimated package bytes with `removed` removed. The protected range ends at the
    /// first removed block (see [`Plan::protect_until`]).
    fn estimate(&self, removed: &BTreeSet<usize>) -> u64 {
        let l = self.cfg.num_layers;
        let spec = PruneSpec::remove_blocks(removed.iter().copied());
        let boundary = removed
            .iter()
            .next()
            .map_or(self.protect_floor, |&f| f.max(self.protect_floor));
        let dense = dense_blocks_for(l, removed, boundary, self.opts.protect_precision);
        estimate_package_bytes(
            self.cfg,
            &spec,
            self.opts.weights,
            self.opts.group,
            &dense,
            self.opts.pos_table_computed,
        )
    }

    /// A given set of removed blocks, checked against the model and the protected range.
    fn explicit(&self, set: BTreeSet<usize>) -> Result<BTreeSet<usize>> {
        let l = self.cfg.num_layers;
        let floor = self.protect_floor;
        if let Some(&b) = set.iter().find(|&&b| b >= l) {
            return Err(Error::invalid(
                "removed blocks",
                format!("block {b} is outside the model's {l} blocks"),
            ));
        }
        if let Some(&b) = set.iter().find(|&&b| b < floor) {
            return Err(Error::invalid(
                "removed blocks",
                format!("block {b} is in the protected range 0..{floor}"),
            ));
        }
        let mut set = set;
        set.extend(self.opts.absent_blocks.iter().copied());
        if set.len() >= l {
            return Err(Error::invalid("removed blocks", "would remove every block"));
        }
        Ok(set)
    }

    /// Removes candidates cheapest first (ties to the later block) until `done`; the
    /// target `what` is named when even every candidate is not enough.
    fn greedy(
        &self,
        done: &dyn Fn(&BTreeSet<usize>) -> bool,
        what: &str,
    ) -> Result<BTreeSet<usize>> {
        let l = self.cfg.num_layers;
        let cost = self.removal_cost;
        let mut order: Vec<usize> = (0..l).filter(|&i| cost[i].is_finite()).collect();
        order.sort_by(|&a, &b| cost[a].total_cmp(&cost[b]).then(b.cmp(&a)));
        let mut removed = self.opts.absent_blocks.clone();
        for &i in order
            .iter()
            .filter(|i| !self.opts.absent_blocks.contains(i))
        {
            if done(&removed) {
                return Ok(removed);
            }
            removed.insert(i);
        }
        if done(&removed) {
            return Ok(removed);
        }
        Err(Error::invalid(
            "plan target",
            format!(
                "a target of {what} cannot be met: even removing all {} candidate blocks \
                 (blocks {}..{} ; protected blocks and the last block are never removed by \
                 the planner) leaves {} blocks, about {} bytes",
                order.len(),
                self.protect_floor,
                l.saturating_sub(1),
                l - removed.len(),
                self.estimate(&removed)
            ),
        ))
    }
}

/// Distillation weight per block: inverse to sensitivity over the kept, unfrozen
/// blocks (mean 1), 0 elsewhere; 1 for each such block without a sensitivity.
fn distillation_weights(kept: &[usize], freeze: &[bool], sensitivity: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; freeze.len()];
    let trainable: Vec<usize> = kept.iter().copied().filter(|&i| !freeze[i]).collect();
    if trainable.is_empty() {
        return out;
    }
    let max_s = sensitivity.iter().copied().fold(0.0f32, f32::max);
    let raw: Vec<f32> = trainable
        .iter()
        .map(|&i| {
            if sensitivity.is_empty() || max_s <= 0.0 {
                1.0
            } else {
                1.0 / (sensitivity[i] / max_s + 1e-3)
            }
        })
        .collect();
    let mean = raw.iter().sum::<f32>() / raw.len() as f32;
    for (&i, r) in trainable.iter().zip(raw) {
        out[i] = r / mean;
    }
    out
}

/// The plan's one-line summary.
#[allow(clippy::too_many_arguments)]
fn summary(
    opts: &PlanOptions,
    measured: bool,
    removed: &[usize],
    spec: &PruneSpec,
    kept: usize,
    l: usize,
    protect_until: usize,
    estimated_bytes: u64,
    dense_f16_bytes: u64,
) -> String {
    let how = match &opts.target {
        PlanTarget::None => "no pruning".to_string(),
        PlanTarget::Remove(_) => "explicit list".to_string(),
        PlanTarget::Preset(p) => format!("preset {p}"),
        PlanTarget::Blocks(n) => format!("target {n} blocks"),
        PlanTarget::Bytes(b) => format!("target {b} bytes"),
        PlanTarget::Ratio(x) => format!("target ratio {x}"),
    };
    let basis = if measured {
        format!("sensitivity + positional prior w={}", opts.position_weight)
    } else {
        "positional prior only".to_string()
    };
    let cuts = component_list(&spec.masks);
    let cuts = if cuts.is_empty() {
        String::new()
    } else {
        format!(", sub-components removed [{}]", cuts.join(", "))
    };
    format!(
        "{how} ({basis}): removed {removed:?}{cuts}, kept {kept}/{l}, protected 0..{protect_until} ({}), \
         {} weights, ~{estimated_bytes} bytes ({:.1}% of f16)",
        match opts.protect_precision {
            ProtectPrecision::F16 => "f16",
            ProtectPrecision::Int4 => "same precision",
        },
        opts.weights,
        100.0 * estimated_bytes as f64 / dense_f16_bytes.max(1) as f64
    )
}

/// `12.ff`-style entries of `masks`, by block then component.
pub fn component_list(masks: &BTreeMap<usize, BlockMask>) -> Vec<String> {
    masks
        .iter()
        .flat_map(|(b, m)| m.names().into_iter().map(move |n| format!("{b}.{n}")))
        .collect()
}

/// Checks the requested sub-component cuts against the plan: each in a kept block
/// past the protected range, `attn2` only in a dual-attention block.
fn check_component_cuts(
    cfg: &MmditConfig,
    cuts: &BTreeMap<usize, BlockMask>,
    removed: &BTreeSet<usize>,
    protect_until: usize,
) -> Result<()> {
    for (&b, mask) in cuts {
        let reason = if b >= cfg.num_layers {
            format!("block {b} is outside the model's {} blocks", cfg.num_layers)
        } else if removed.contains(&b) {
            format!("block {b} is removed whole")
        } else if b < protect_until {
            format!("block {b} is in the protected range 0..{protect_until}")
        } else if mask.attn2 && !cfg.is_dual(b) {
            format!("block {b} has no attn2 (not a dual-attention block)")
        } else {
            continue;
        };
        return Err(Error::invalid("remove_components", reason));
    }
    Ok(())
}

/// Sub-component cuts the report measures as cheaper than the costliest removed block
/// (see [`Plan::proposed_components`]).
fn propose_components(
    report: &SensitivityReport,
    removed: &BTreeSet<usize>,
    already: &BTreeMap<usize, BlockMask>,
    protect_until: usize,
    sensitivity: &[f32],
) -> Vec<String> {
    let Some(threshold) = removed
        .iter()
        .filter_map(|&b| sensitivity.get(b).copied())
        .filter(|v| v.is_finite())
        .reduce(f32::max)
    else {
        return Vec::new();
    };
    let mut found: Vec<(f32, String)> = report
        .blocks
        .iter()
        .filter(|b| b.block >= protect_until && !removed.contains(&b.block))
        .flat_map(|b| {
            let mask = already.get(&b.block).copied().unwrap_or_default();
            b.components
                .iter()
                .filter(move |c| !mask.names().contains(&c.component.as_str()))
                .filter(move |c| c.rel_l2.is_finite() && c.rel_l2 <= threshold)
                .map(move |c| (c.rel_l2, format!("{}.{}", b.block, c.component)))
        })
        .collect();
    found.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    found.into_iter().map(|(_, name)| name).collect()
}

/// The kept blocks below `protect_until`, when they stay f16.
fn dense_blocks_for(
    l: usize,
    removed: &BTreeSet<usize>,
    protect_until: usize,
    precision: ProtectPrecision,
) -> BTreeSet<usize> {
    match precision {
        ProtectPrecision::Int4 => BTreeSet::new(),
        ProtectPrecision::F16 => (0..protect_until.min(l))
            .filter(|i| !removed.contains(i))
            .collect(),
    }
}

impl Plan {
    /// `base` with this plan's removed blocks, protected f16 blocks and provenance.
    pub fn compress_options(&self, base: CompressOptions) -> CompressOptions {
        CompressOptions {
            spec: PruneSpec {
                removed_blocks: self.removed_blocks.iter().copied().collect(),
                masks: self.removed_components.clone(),
            },
            dense_blocks: dense_blocks_for(
                self.num_layers,
                &self.removed_blocks.iter().copied().collect(),
                self.protect_until,
                self.protect_precision,
            ),
            plan_summary: self.summary.clone(),
            sensitivity: self.sensitivity.clone(),
            distillation_weights: self.distillation_weights.clone(),
            ..base
        }
    }

    /// The plan as pretty JSON (the report an external distillation trainer reads).
    pub fn to_json(&self) -> Result<String> {
        // JSON has no infinity: non-candidates are written as null.
        let mut v =
            serde_json::to_value(self).map_err(|e| Error::invalid("plan", e.to_string()))?;
        if let Some(costs) = v.get_mut("removal_cost") {
            *costs = serde_json::Value::Array(
                self.removal_cost
                    .iter()
                    .map(|c| {
                        serde_json::Number::from_f64(*c as f64)
                            .map_or(serde_json::Value::Null, serde_json::Value::Number)
                    })
                    .collect(),
            );
        }
        serde_json::to_string_pretty(&v).map_err(|e| Error::invalid("plan", e.to_string()))
    }
}
