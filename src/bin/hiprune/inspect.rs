//! `hiprune inspect`: what a package holds and how much smaller it is than dense f16;
//! for a checkpoint (single file or diffusers folder), its configuration, the blocks it
//! holds and lacks, and the other components in the file.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use hiprune::format::Precision;
use hiprune::model::checkpoint::Component;
use hiprune::model::{Checkpoint, CheckpointKind, MmditConfig, PruneSpec, WeightBytes, Weights};
use hiprune::{Error, Package, Result};
use serde::Serialize;

use crate::report::{Table, human_bytes};
use crate::source::CheckpointArgs;

#[derive(Serialize)]
struct LayerInfo {
    name: String,
    precision: String,
    out_features: u64,
    in_features: u64,
    bytes: u64,
    dense_f16_bytes: u64,
}

#[derive(Serialize)]
struct InspectReport {
    path: String,
    file_bytes: u64,
    format_version: u32,
    architecture: Option<hiprune::model::MmditConfig>,
    kept_blocks: Vec<u32>,
    removed_blocks: Vec<u32>,
    removed_components: Vec<hiprune::format::ComponentCut>,
    layers: Vec<LayerInfo>,
    bytes_by_precision: BTreeMap<String, u64>,
    other_tensor_bytes: u64,
    tensor_bytes: u64,
    dense_f16_bytes: u64,
    reduction_vs_f16: f64,
    provenance: hiprune::format::Provenance,
    checksums_verified: bool,
    /// The weights a model loaded from the package holds, by storage: the count that
    /// `hp_model_get_info` and `bench model` report (absent without an architecture).
    weight_bytes: Option<WeightBytes>,
}

/// Runs `hiprune inspect`.
pub fn run(path: &Path, checkpoint: &CheckpointArgs, json: bool, verify: bool) -> Result<()> {
    if Checkpoint::kind_of(path)? != CheckpointKind::Package {
        if verify {
            return Err(Error::invalid(
                "--verify",
                "checks a package's checksums; a checkpoint has none",
            ));
        }
        return run_checkpoint(&checkpoint.open(path)?, json);
    }
    let package = Package::open(path)?;
    if verify {
        package.verify()?;
    }
    let manifest = package.manifest();
    let mut layer_tensors = HashSet::new();
    let mut layers = Vec::new();
    let mut bytes_by_precision = BTreeMap::new();
    for layer in &manifest.layers {
        let names = layer.tensor_names();
        let bytes: u64 = names
            .iter()
            .map(|t| package.tensor(t).map(|v| v.bytes().len() as u64))
            .sum::<Result<u64>>()?;
        let elements = layer
            .out_features
            .checked_mul(layer.in_features)
            .ok_or_else(|| {
                Error::invalid(
                    format!("layer `{}`", layer.name),
                    "out_features x in_features overflows",
                )
            })?;
        let dense_f16_bytes = 2
            * (elements
                + if layer.has_bias {
                    layer.out_features
                } else {
                    0
                });
        *bytes_by_precision
            .entry(precision_family(layer.precision).to_string())
            .or_insert(0) += bytes;
        layer_tensors.extend(names);
        layers.push(LayerInfo {
            name: layer.name.clone(),
            precision: layer.precision.to_string(),
            out_features: layer.out_features,
            in_features: layer.in_features,
            bytes,
            dense_f16_bytes,
        });
    }
    let mut other_tensor_bytes = 0u64;
    let mut other_f16_bytes = 0u64;
    for entry in manifest
        .tensors
        .iter()
        .filter(|t| !layer_tensors.contains(&t.name))
    {
        let bytes = package.tensor(&entry.name)?.bytes().len() as u64;
        other_tensor_bytes += bytes;
        other_f16_bytes += bytes * 2 / entry.dtype.size().max(1) as u64;
    }
    let tensor_bytes = layers.iter().map(|l| l.bytes).sum::<u64>() + other_tensor_bytes;
    let dense_f16_bytes = layers.iter().map(|l| l.dense_f16_bytes).sum::<u64>() + other_f16_bytes;
    let removed_blocks = match &manifest.architecture {
        Some(arch) => (0..arch.num_layers as u32)
            .filter(|b| !manifest.kept_blocks.contains(b))
            .collect(),
        None => Vec::new(),
    };
    let report = InspectReport {
        path: path.display().to_string(),
        file_bytes: package.file_len(),
        format_version: manifest.format_version,
        architecture: manifest.architecture.clone(),
        kept_blocks: manifest.kept_blocks.clone(),
        removed_blocks,
        removed_components: manifest.removed_components.clone(),
        layers,
        bytes_by_precision,
        other_tensor_bytes,
        tensor_bytes,
        dense_f16_bytes,
        reduction_vs_f16: 1.0 - tensor_bytes as f64 / dense_f16_bytes.max(1) as f64,
        provenance: manifest.provenance.clone(),
        checksums_verified: verify,
        weight_bytes: None,
    };
    let report = InspectReport {
        weight_bytes: held_weight_bytes(package)?,
        ..report
    };
    if json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::invalid("report", e.to_string()))?;
        println!("{text}");
    } else {
        print_report(&report);
    }
    Ok(())
}

/// The weights a model loaded from `package` holds (see [`WeightBytes`]).
fn held_weight_bytes(package: Package) -> Result<Option<WeightBytes>> {
    let Some(cfg) = package.manifest().architecture.clone() else {
        return Ok(None);
    };
    cfg.validate()?;
    let m = package.manifest();
    let spec = PruneSpec::from_manifest(cfg.num_layers, &m.kept_blocks, &m.removed_components)?;
    WeightBytes::count(&Weights::from_package(package), &cfg, &spec).map(Some)
}

fn precision_family(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "f32",
        Precision::F16 => "f16",
        Precision::Bf16 => "bf16",
        Precision::Int4 { .. } => "int4",
        Precision::Nf4 { .. } => "nf4",
        Precision::Int4Sym { .. } => "int4sym",
        Precision::Sincos2d { .. } => "computed",
    }
}

fn print_report(r: &InspectReport) {
    println!(
        "package: {} ({}, format v{})",
        r.path,
        human_bytes(r.file_bytes),
        r.format_version
    );
    match &r.architecture {
        Some(a) => println!(
            "architecture: MMDiT, {} blocks, D = {} ({} heads x {}), qk_norm {}, dual attention in {:?}",
            a.num_layers,
            a.hidden_size(),
            a.num_attention_heads,
            a.attention_head_dim,
            a.qk_norm.as_deref().unwrap_or("none"),
            a.dual_attention_layers
        ),
        None => println!("architecture: none (a layer collection)"),
    }
    if r.architecture.is_some() {
        println!("kept blocks ({}): {:?}", r.kept_blocks.len(), r.kept_blocks);
        println!(
            "removed blocks ({}): {:?}",
            r.removed_blocks.len(),
            r.removed_blocks
        );
        if !r.removed_components.is_empty() {
            let cuts: Vec<String> = r
                .removed_components
                .iter()
                .flat_map(|c| c.components.iter().map(move |n| format!("{}.{n}", c.block)))
                .collect();
            println!(
                "removed sub-components ({}): {}",
                cuts.len(),
                cuts.join(", ")
            );
        }
    }
    if !r.provenance.source.is_empty() {
        println!(
            "source: {} ({})",
            r.provenance.source,
            human_bytes(r.provenance.source_bytes)
        );
    }
    if !r.provenance.quantizer.is_empty() {
        println!("quantiser: {}", r.provenance.quantizer);
    }
    let mut table = Table::new(&["layer", "precision", "N x K", "bytes", "vs f16"]);
    for l in &r.layers {
        table.row(vec![
            l.name.clone(),
            l.precision.clone(),
            format!("{} x {}", l.out_features, l.in_features),
            human_bytes(l.bytes),
            if l.bytes == 0 {
                "not stored".to_string()
            } else {
                format!("{:.2}x smaller", l.dense_f16_bytes as f64 / l.bytes as f64)
            },
        ]);
    }
    print!("{}", table.render());
    for (precision, bytes) in &r.bytes_by_precision {
        println!("{precision:>6} layers: {}", human_bytes(*bytes));
    }
    println!(" other tensors: {}", human_bytes(r.other_tensor_bytes));
    if let Some(w) = &r.weight_bytes {
        println!(
            "held when loaded: {} ({} linear weights, {} biases, small tensors and table)",
            human_bytes(w.total()),
            human_bytes(w.linear()),
            human_bytes(w.other)
        );
    }
    println!(
        "total: {} vs {} dense f16 ({:.1}% smaller){}",
        human_bytes(r.tensor_bytes),
        human_bytes(r.dense_f16_bytes),
        100.0 * r.reduction_vs_f16,
        if r.checksums_verified {
            "; all checksums verified"
        } else {
            ""
        }
    );
}

#[derive(Serialize)]
struct CheckpointReport {
    path: String,
    kind: &'static str,
    file_bytes: u64,
    config_inferred: bool,
    architecture: MmditConfig,
    present_blocks: Vec<usize>,
    missing_blocks: Vec<usize>,
    weight_bytes: WeightBytes,
    components: Vec<Component>,
}

/// `inspect` of a checkpoint that is not a package.
fn run_checkpoint(ck: &Checkpoint, json: bool) -> Result<()> {
    let missing = ck.missing_blocks();
    let report = CheckpointReport {
        path: ck.path.display().to_string(),
        kind: ck.kind.describe(),
        file_bytes: ck.file_bytes()?,
        config_inferred: ck.config_inferred,
        architecture: ck.config.clone(),
        present_blocks: ck.spec.kept_blocks(ck.config.num_layers),
        missing_blocks: missing,
        weight_bytes: WeightBytes::count(&ck.weights, &ck.config, &ck.spec)?,
        components: ck.components.clone(),
    };
    if json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::invalid("report", e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    let a = &report.architecture;
    println!(
        "{}: {} ({})",
        report.kind,
        report.path,
        human_bytes(report.file_bytes)
    );
    println!(
        "architecture{}: MMDiT, {} blocks, D = {} ({} heads x {}), qk_norm {}, dual attention in {:?}, positional grid {}",
        if report.config_inferred {
            " (read from the tensor shapes)"
        } else {
            ""
        },
        a.num_layers,
        a.hidden_size(),
        a.num_attention_heads,
        a.attention_head_dim,
        a.qk_norm.as_deref().unwrap_or("none"),
        a.dual_attention_layers,
        a.pos_embed_max_size
    );
    println!(
        "blocks present ({}): {:?}",
        report.present_blocks.len(),
        report.present_blocks
    );
    if report.missing_blocks.is_empty() {
        println!("missing blocks: none");
    } else {
        println!(
            "missing blocks ({}, a pruned model: they are not run): {:?}",
            report.missing_blocks.len(),
            report.missing_blocks
        );
    }
    let w = &report.weight_bytes;
    println!(
        "transformer held when loaded: {} ({} linear weights, {} biases, small tensors and table)",
        human_bytes(w.total()),
        human_bytes(w.linear()),
        human_bytes(w.other)
    );
    for c in &report.components {
        println!(
            "component {}: {} tensors, {} ({}); not read by the transformer",
            c.name,
            c.tensors,
            human_bytes(c.bytes),
            c.dtypes.join(", ")
        );
    }
    Ok(())
}
