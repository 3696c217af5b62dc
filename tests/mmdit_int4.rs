//! INT4 weights in the MMDiT engine: a generated model whose linear layers are
//! quantised (layers whose K no allowed group divides stay dense) must give the same
//! output as a dense run of the dequantised weights, in memory and through an .hpk
//! package (with a pruned block).

mod common;

use common::rel_err;

use std::collections::HashMap;

use hiprune::format::{PackageInfo, Precision};
use hiprune::model::layout::{Required, required_tensors};
use hiprune::model::{MemoryTensor, Mmdit, MmditConfig, MmditInputs, PruneSpec, Tensor, Weights};
use hiprune::quant::{INT4_GROUP_SIZES, Int4Options, Q4Matrix, quantize_int4};
use hiprune::{Package, PackageWriter};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The largest allowed INT4 group (up to `preferred`) that divides `k`; `None` keeps
/// the layer dense.
fn int4_group_for(k: usize, preferred: usize) -> Option<usize> {
    INT4_GROUP_SIZES
        .iter()
        .rev()
        .copied()
        .find(|&g| g <= preferred && k.is_multiple_of(g))
}

fn config() -> MmditConfig {
    MmditConfig {
        sample_size: 8,
        patch_size: 2,
        in_channels: 4,
        out_channels: 4,
        num_layers: 3,
        attention_head_dim: 32,
        num_attention_heads: 2,
        joint_attention_dim: 96,
        caption_projection_dim: 64,
        pooled_projection_dim: 40, // not a multiple of 32: stays dense
        pos_embed_max_size: 8,
        qk_norm: Some("rms_norm".into()),
        dual_attention_layers: vec![0],
    }
}

fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect()
}

/// A generated linear layer: name, n, k, weight [n, k], bias [n].
type Layer = (String, usize, usize, Vec<f32>, Vec<f32>);

/// Seeded weights: linear layers and plain tensors.
struct Generated {
    linears: Vec<Layer>,
    plain: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn generate(cfg: &MmditConfig, seed: u64) -> Generated {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut g = Generated {
        linears: Vec::new(),
        plain: Vec::new(),
    };
    for req in required_tensors(cfg, &PruneSpec::none()) {
        match req {
            Required::Linear { name, n, k } => {
                let w = randn(&mut rng, n * k, 1.5 / (k as f32).sqrt());
                let b = randn(&mut rng, n, 0.1);
                g.linears.push((name, n, k, w, b));
            }
            Required::Plain { name, shape } => {
                let len = shape.iter().product();
                let data = if name.ends_with("norm_q.weight")
                    || name.contains("norm_k")
                    || name.contains("norm_added")
                {
                    (0..len)
                        .map(|_| 1.0 + rng.random_range(-0.2f32..0.2))
                        .collect()
                } else {
                    randn(&mut rng, len, 0.5)
                };
                g.plain.push((name, shape, data));
            }
        }
    }
    g
}

fn dequantize(q: &Q4Matrix) -> Vec<f32> {
    let view = q.view().unwrap();
    let mut out = vec![0.0f32; q.n * q.k];
    for (r, row) in out.chunks_mut(q.k).enumerate() {
        view.dequantize_row(r, row);
    }
    out
}

/// Quantises every layer it can; returns (q4 layers, dense-equivalent weights).
fn quantize(g: &Generated, group: usize) -> HashMap<String, Q4Matrix> {
    let mut q = HashMap::new();
    for (name, n, k, w, _) in &g.linears {
        if let Some(gs) = int4_group_for(*k, group) {
            let opts = Int4Options {
                group: gs,
                ..Int4Options::default()
            };
            q.insert(name.clone(), quantize_int4(w, *n, *k, &opts).unwrap());
        }
    }
    q
}

fn memory_weights(g: &Generated, q4: &HashMap<String, Q4Matrix>, keep_q4: bool) -> Weights {
    let mut map = HashMap::new();
    for (name, n, k, w, b) in &g.linears {
        let weight = match q4.get(name) {
            Some(q) if keep_q4 => MemoryTensor::Q4(q.clone()),
            Some(q) => MemoryTensor::F32(Tensor::new(dequantize(q), vec![*n, *k]).unwrap()),
            None => MemoryTensor::F32(Tensor::new(w.clone(), vec![*n, *k]).unwrap()),
        };
        map.insert(format!("{name}.weight"), weight);
        map.insert(
            format!("{name}.bias"),
            MemoryTensor::F32(Tensor::new(b.clone(), vec![*n]).unwrap()),
        );
    }
    for (name, shape, data) in &g.plain {
        map.insert(
            name.clone(),
            MemoryTensor::F32(Tensor::new(data.clone(), shape.clone()).unwrap()),
        );
    }
    Weights::from_memory(map)
}

struct Inputs {
    hs: Tensor,
    ehs: Tensor,
    pooled: Tensor,
    t: Tensor,
}

fn inputs(cfg: &MmditConfig, batch: usize, h: usize, w: usize, seq: usize, seed: u64) -> Inputs {
    let mut rng = StdRng::seed_from_u64(seed);
    Inputs {
        hs: Tensor::new(
            randn(&mut rng, batch * cfg.in_channels * h * w, 1.0),
            vec![batch, cfg.in_channels, h, w],
        )
        .unwrap(),
        ehs: Tensor::new(
            randn(&mut rng, batch * seq * cfg.joint_attention_dim, 1.0),
            vec![batch, seq, cfg.joint_attention_dim],
        )
        .unwrap(),
        pooled: Tensor::new(
            randn(&mut rng, batch * cfg.pooled_projection_dim, 1.0),
            vec![batch, cfg.pooled_projection_dim],
        )
        .unwrap(),
        t: Tensor::new(
            (0..batch)
                .map(|_| rng.random_range(0.0f32..1000.0))
                .collect(),
            vec![batch],
        )
        .unwrap(),
    }
}

fn run(model: &Mmdit, i: &Inputs) -> Tensor {
    model
        .forward(&MmditInputs {
            hidden_states: &i.hs,
            encoder_hidden_states: &i.ehs,
            pooled_projections: &i.pooled,
            timestep: &i.t,
        })
        .unwrap()
}

#[test]
fn group_rule_keeps_odd_layers_dense() {
    assert_eq!(int4_group_for(64, 64), Some(64));
    assert_eq!(int4_group_for(96, 64), Some(32));
    assert_eq!(int4_group_for(256, 128), Some(128));
    assert_eq!(int4_group_for(40, 64), None);
    assert_eq!(int4_group_for(16, 64), None);
}

#[test]
fn int4_model_matches_dequantized_dense_model() {
    let cfg = config();
    let g = generate(&cfg, 11);
    for group in [32, 64] {
        let q4 = quantize(&g, group);
        assert!(
            q4.len() > g.linears.len() / 2,
            "only {} layers quantised",
            q4.len()
        );
        assert!(!q4.contains_key("time_text_embed.text_embedder.linear_1"));
        let qm = Mmdit::new(
            cfg.clone(),
            memory_weights(&g, &q4, true),
            PruneSpec::none(),
        )
        .unwrap();
        let dm = Mmdit::new(
            cfg.clone(),
            memory_weights(&g, &q4, false),
            PruneSpec::none(),
        )
        .unwrap();
        // Batch 1 with few tokens (GEMV path for the modulation), batch 2 larger.
        for (batch, h, w, seq) in [(1, 2, 4, 3), (2, 8, 6, 7)] {
            let inp = inputs(&cfg, batch, h, w, seq, 5 + batch as u64);
            let (a, b) = (run(&qm, &inp), run(&dm, &inp));
            let err = rel_err(&a, &b);
            eprintln!("group {group}, batch {batch}, {h}x{w}: max|err|/max|ref| = {err:.3e}");
            assert!(err <= 1e-4, "{err}");
        }
    }
}

#[test]
fn int4_package_runs_its_kept_blocks() {
    let cfg = config();
    let g = generate(&cfg, 12);
    let q4 = quantize(&g, 64);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.hpk");
    let mut writer = PackageWriter::create(&path).unwrap();
    for (name, n, k, w, b) in &g.linears {
        if name.starts_with("transformer_blocks.1.") {
            continue; // the pruned block is not stored
        }
        match q4.get(name) {
            Some(q) => writer.add_q4_layer(name, q, Some(b)).unwrap(),
            None => writer
                .add_dense_layer(
                    name,
                    Precision::F32,
                    *n,
                    *k,
                    bytemuck::cast_slice(w),
                    Some(b),
                )
                .unwrap(),
        }
    }
    for (name, shape, data) in &g.plain {
        if !name.starts_with("transformer_blocks.1.") {
            writer.add_f32(name, shape, data).unwrap();
        }
    }
    writer
        .finish(PackageInfo {
            architecture: Some(cfg.clone()),
            kept_blocks: vec![0, 2],
            ..PackageInfo::default()
        })
        .unwrap();
    let packaged = Mmdit::load(&path).unwrap();
    assert_eq!(
        packaged.prune_spec().kept_blocks(cfg.num_layers),
        vec![0, 2]
    );
    let dense = Mmdit::new(
        cfg.clone(),
        memory_weights(&g, &q4, false),
        PruneSpec::remove_blocks([1]),
    )
    .unwrap();
    let inp = inputs(&cfg, 2, 4, 8, 5, 3);
    let err = rel_err(&run(&packaged, &inp), &run(&dense, &inp));
    eprintln!("package: max|err|/max|ref| = {err:.3e}");
    assert!(err <= 1e-4, "{err}");

    // Asking the package for its missing block names the first absent tensor.
    let mut m = Mmdit::load(&path).unwrap();
    let e = m.set_prune(PruneSpec::none()).unwrap_err();
    assert!(e.to_string().contains("transformer_blocks.1."), "{e}");
    drop(Package::open(&path).unwrap());
}
