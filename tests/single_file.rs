//! Stability AI single-file checkpoints (tests/fixtures/single_file, written from the
//! diffusers fixtures by make_single_files.py): the forward on each equals diffusers'
//! reference outputs, pruned files load with their gaps as removed blocks, bf16 and
//! fp8 sources read exactly, and malformed files get typed errors.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{fixture, forward_on_fixture_inputs, rel_err};
use half::bf16;
use hiprune::Error;
use hiprune::Package;
use hiprune::backend::CpuBackend;
use hiprune::compress::{CompressOptions, WeightFormat, compress_checkpoint};
use hiprune::model::checkpoint::SingleFileRule;
use hiprune::model::layout::{Required, required_tensors};
use hiprune::model::{
    Checkpoint, CheckpointKind, CheckpointOptions, MemoryTensor, Mmdit, MmditConfig, MmditInputs,
    PruneSpec, Tensor, TensorFile, Weights,
};
use safetensors::SafeTensors;

const TOL: f32 = 1e-4;

fn single(name: &str) -> PathBuf {
    fixture("../single_file").join(name)
}

/// The fixtures' heads are 8 wide (D = 16 = 2 x 8).
fn head8() -> CheckpointOptions {
    CheckpointOptions {
        config: None,
        head_dim: Some(8),
    }
}

fn open(name: &str) -> Checkpoint {
    Checkpoint::open(single(name), &head8()).unwrap()
}

fn reference(folder: &str, output: &str) -> Tensor {
    let outputs = TensorFile::open(fixture(folder).join("outputs.safetensors")).unwrap();
    outputs.get(output).unwrap().clone()
}

fn check(model: &Mmdit, folder: &str, output: &str, what: &str) {
    let err = rel_err(
        &forward_on_fixture_inputs(model, folder),
        &reference(folder, output),
    );
    eprintln!("{what} vs {folder}/{output}: {err:.3e}");
    assert!(err <= TOL, "{what}: relative error {err:.3e} > {TOL:e}");
}

fn model_of(name: &str) -> Mmdit {
    Mmdit::from_checkpoint(CpuBackend::new(), open(name)).unwrap()
}

/// The fixture's config.json without `sample_size`, which a single file does not store.
fn folder_config(folder: &str) -> MmditConfig {
    MmditConfig::from_file(fixture(folder).join("config.json")).unwrap()
}

fn same_architecture(inferred: &MmditConfig, folder: &str) {
    let want = MmditConfig {
        sample_size: inferred.sample_size,
        ..folder_config(folder)
    };
    assert_eq!(*inferred, want, "{folder}");
}

#[test]
fn each_single_file_matches_diffusers() {
    check(
        &model_of("sd3.safetensors"),
        "sd3",
        "output",
        "sd3 (prefixed, with components)",
    );
    check(
        &model_of("sd35.safetensors"),
        "sd35",
        "output",
        "sd35 (no prefix)",
    );
    check(
        &model_of("mmditx.safetensors"),
        "mmditx",
        "output",
        "mmditx",
    );
    let mut m = model_of("mmditx.safetensors");
    m.set_prune(PruneSpec::remove_blocks([1])).unwrap();
    check(
        &m,
        "mmditx",
        "output_removed_1",
        "mmditx, block 1 removed at run time",
    );
}

#[test]
fn configuration_is_read_from_the_shapes() {
    for (file, folder) in [
        ("sd3.safetensors", "sd3"),
        ("sd35.safetensors", "sd35"),
        ("mmditx.safetensors", "mmditx"),
    ] {
        let ck = open(file);
        assert_eq!(ck.kind, CheckpointKind::SingleFile);
        assert!(ck.config_inferred);
        same_architecture(&ck.config, folder);
        assert_eq!(ck.config.sample_size, 128, "the SD3 family's default");
        assert!(ck.missing_blocks().is_empty(), "{file}");
    }
    // The head count comes from the head width, never from the block count.
    let ck = Checkpoint::open(
        single("sd35.safetensors"),
        &CheckpointOptions {
            config: None,
            head_dim: Some(4),
        },
    )
    .unwrap();
    assert_eq!(ck.config.num_attention_heads, 4);
    assert_eq!(ck.config.num_layers, 4);
}

#[test]
fn a_given_config_overrides_the_shapes() {
    let opts = CheckpointOptions {
        config: Some(fixture("sd35").join("config.json")),
        head_dim: None,
    };
    let ck = Checkpoint::open(single("sd35.safetensors"), &opts).unwrap();
    assert!(!ck.config_inferred);
    assert_eq!(ck.config, folder_config("sd35"));
    check(
        &Mmdit::from_checkpoint(CpuBackend::new(), ck).unwrap(),
        "sd35",
        "output",
        "sd35 with --config",
    );
    // A config that contradicts the file fails at load, naming the tensor.
    let opts = CheckpointOptions {
        config: Some(fixture("mmditx").join("config.json")),
        head_dim: None,
    };
    let ck = Checkpoint::open(single("sd35.safetensors"), &opts).unwrap();
    let err = Mmdit::from_checkpoint(CpuBackend::new(), ck).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { tensor, .. } if tensor.starts_with("transformer_blocks.0.norm1")),
        "{err}"
    );
}

#[test]
fn a_pruned_single_file_loads_with_its_gaps_removed() {
    let ck = open("sd35_pruned.safetensors");
    assert_eq!(ck.config.num_layers, 4, "the original depth");
    assert_eq!(ck.missing_blocks(), vec![1]);
    check(
        &Mmdit::from_checkpoint(CpuBackend::new(), ck).unwrap(),
        "sd35",
        "output_removed_1",
        "sd35 without block 1 (index kept)",
    );
    // Without the last (context_pre_only) block the depth is the last index + 2: the
    // new last block runs as an ordinary block, as in the reference.
    let ck = open("sd35_no_last.safetensors");
    assert_eq!(ck.config.num_layers, 4);
    assert_eq!(ck.missing_blocks(), vec![3]);
    check(
        &Mmdit::from_checkpoint(CpuBackend::new(), ck).unwrap(),
        "sd35",
        "output_removed_last",
        "sd35 without its last block",
    );
}

#[test]
fn other_components_are_listed_and_skipped() {
    let ck = open("sd3.safetensors");
    let names: Vec<&str> = ck.components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["clip_g", "clip_l", "t5xxl", "vae"]);
    let t5 = &ck.components[2];
    assert_eq!(t5.tensors, 2);
    assert_eq!(t5.dtypes, ["F16", "F8_E4M3"]);
    assert!(
        !ck.weights
            .contains("text_encoders.t5xxl.transformer.shared.weight")
    );
}

/// The sd3 fixture's weights rounded through `round`, as a model in memory.
fn rounded_sd3(round: impl Fn(f32) -> f32) -> Mmdit {
    let ck = Checkpoint::open(fixture("sd3"), &CheckpointOptions::default()).unwrap();
    let mut tensors = HashMap::new();
    let mut add = |name: String, shape: Vec<usize>| {
        let data = ck.weights.f32_tensor(&name, &shape).unwrap();
        let data = data.into_iter().map(&round).collect();
        tensors.insert(name, MemoryTensor::F32(Tensor::new(data, shape).unwrap()));
    };
    for req in required_tensors(&ck.config, &PruneSpec::none()) {
        match req {
            Required::Linear { name, n, k } => {
                add(format!("{name}.weight"), vec![n, k]);
                add(format!("{name}.bias"), vec![n]);
            }
            Required::Plain { name, shape } => add(name, shape),
        }
    }
    let config = ck.config.clone();
    Mmdit::new(config, Weights::from_memory(tensors), PruneSpec::none()).unwrap()
}

/// f32 to float8_e4m3fn and back: round to nearest, ties to even, saturating at 448.
fn e4m3_round(v: f32) -> f32 {
    let mut values: Vec<f64> = (0..127u32)
        .map(|c| {
            let (e, m) = ((c >> 3) as i32, f64::from(c & 7));
            if e == 0 {
                m / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m / 8.0) * 2f64.powi(e - 7)
            }
        })
        .collect();
    values.sort_by(f64::total_cmp);
    let a = f64::from(v.abs()).min(448.0);
    let (mut best, mut best_err) = (0usize, f64::INFINITY);
    for (i, &x) in values.iter().enumerate() {
        let err = (x - a).abs();
        if err < best_err || (err == best_err && i % 2 == 0) {
            best = i;
            best_err = err;
        }
    }
    (values[best] as f32).copysign(v)
}

#[test]
fn bf16_and_fp8_single_files_read_exactly() {
    let want = forward_on_fixture_inputs(&rounded_sd3(|v| bf16::from_f32(v).to_f32()), "sd3");
    let got = forward_on_fixture_inputs(&model_of("sd3_bf16.safetensors"), "sd3");
    let err = rel_err(&got, &want);
    eprintln!("bf16 single file vs the same weights in memory: {err:.3e}");
    assert!(err <= 1e-5, "{err:.3e}");
    let vs_f32 = rel_err(&got, &reference("sd3", "output"));
    eprintln!("bf16 single file vs the f32 diffusers reference: {vs_f32:.3e}");
    assert!(vs_f32 < 5e-2, "{vs_f32:.3e}");

    let want = forward_on_fixture_inputs(&rounded_sd3(e4m3_round), "sd3");
    let got = forward_on_fixture_inputs(&model_of("sd3_fp8.safetensors"), "sd3");
    let err = rel_err(&got, &want);
    eprintln!("fp8 e4m3 single file vs the same weights in memory: {err:.3e}");
    assert!(err <= 1e-5, "{err:.3e}");
}

#[test]
fn compress_reads_a_pruned_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let f32_pkg = dir.path().join("f32.hpk");
    let ck = open("sd35_pruned.safetensors");
    let opts = CompressOptions {
        weights: WeightFormat::F32,
        ..CompressOptions::default()
    };
    hiprune::compress::compress_opened(&ck, &f32_pkg, &opts, &mut |_| {}).unwrap();
    let package = Package::open(&f32_pkg).unwrap();
    assert_eq!(
        package.manifest().kept_blocks,
        vec![0, 2, 3],
        "original indices"
    );
    check(
        &Mmdit::load(&f32_pkg).unwrap(),
        "sd35",
        "output_removed_1",
        "f32 package of the pruned file",
    );

    // INT4: q, k and v are layers of their own (here K = 16 is below the smallest
    // group, so they stay f16 like every K = 16 layer; the K = 64 `ff.net.2` is 4-bit).
    let int4_pkg = dir.path().join("int4.hpk");
    let opts = CompressOptions {
        group: 32,
        ..CompressOptions::default()
    };
    hiprune::compress::compress_opened(&ck, &int4_pkg, &opts, &mut |_| {}).unwrap();
    let package = Package::open(&int4_pkg).unwrap();
    for q in [
        "to_q",
        "to_k",
        "to_v",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
    ] {
        let layer = package
            .layer(&format!("transformer_blocks.2.attn.{q}"))
            .unwrap();
        assert_eq!((layer.out_features, layer.in_features), (16, 16), "{q}");
    }
    let ff = package.layer("transformer_blocks.2.ff.net.2").unwrap();
    assert!(ff.precision.q4().is_some(), "{:?}", ff.precision);
    assert!(package.layer("transformer_blocks.1.attn.to_q").is_err());
    assert!(
        package
            .manifest()
            .layers
            .iter()
            .all(|l| !l.name.contains("qkv")),
        "no fused layer in the package"
    );
    // The path form opens a single file with the default head width (64), which this
    // D = 16 fixture does not have: a typed error, nothing written.
    let out = dir.path().join("none.hpk");
    let err =
        compress_checkpoint(&single("sd35.safetensors"), &out, &opts, &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            err,
            Error::SingleFile {
                rule: SingleFileRule::HeadDim {
                    hidden: 16,
                    head_dim: 64
                },
                ..
            }
        ),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn kinds_are_told_apart() {
    assert_eq!(
        Checkpoint::kind_of(fixture("sd35")).unwrap(),
        CheckpointKind::DiffusersFolder
    );
    assert_eq!(
        Checkpoint::kind_of(single("sd35.safetensors")).unwrap(),
        CheckpointKind::SingleFile
    );
    let err = Checkpoint::kind_of(fixture("sd35").join("config.json")).unwrap_err();
    assert!(
        err.to_string()
            .contains("not an .hpk package or a safetensors checkpoint"),
        "{err}"
    );
    assert!(err.to_string().contains("config.json"), "{err}");
}

/// The tensors of a fixture single file, to be edited.
fn tensors_of(name: &str) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(single(name)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                v.dtype(),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write(dir: &Path, tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) -> PathBuf {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let path = dir.join("edited.safetensors");
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

fn rule_of(path: &Path, opts: &CheckpointOptions) -> SingleFileRule {
    match Checkpoint::open(path, opts) {
        Err(Error::SingleFile { path: p, rule }) => {
            assert_eq!(p, path);
            rule
        }
        other => panic!("expected a single-file rule error, got {other:?}"),
    }
}

/// Replaces tensor `name` by its first `rows` rows.
fn truncate_rows(
    t: &mut [(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
    name: &str,
    rows: usize,
) {
    let e = t.iter_mut().find(|e| e.0 == name).unwrap();
    let row_bytes = e.3.len() / e.2[0];
    e.2[0] = rows;
    e.3.truncate(rows * row_bytes);
}

#[test]
fn malformed_single_files_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();

    let mut t = tensors_of("sd35.safetensors");
    truncate_rows(&mut t, "joint_blocks.0.x_block.attn.qkv.weight", 47);
    let rule = rule_of(&write(dir.path(), &t), &head8());
    assert!(
        matches!(rule, SingleFileRule::QkvRows { rows: 47, .. }),
        "{rule}"
    );

    let mut t = tensors_of("sd35.safetensors");
    t.retain(|e| !e.0.starts_with("joint_blocks.2.context_block."));
    let rule = rule_of(&write(dir.path(), &t), &head8());
    assert_eq!(
        rule,
        SingleFileRule::MissingStream {
            block: 2,
            present: "x_block",
            missing: "context_block"
        }
    );

    let t = tensors_of("sd35.safetensors");
    let rule = rule_of(&write(dir.path(), &t), &CheckpointOptions::default());
    assert_eq!(
        rule,
        SingleFileRule::HeadDim {
            hidden: 16,
            head_dim: 64
        }
    );
    let rule = rule_of(
        &write(dir.path(), &t),
        &CheckpointOptions {
            config: None,
            head_dim: Some(5),
        },
    );
    assert_eq!(
        rule,
        SingleFileRule::HeadDim {
            hidden: 16,
            head_dim: 5
        }
    );

    let mut t = tensors_of("sd35.safetensors");
    truncate_rows(&mut t, "joint_blocks.2.x_block.mlp.fc1.weight", 32);
    let rule = rule_of(&write(dir.path(), &t), &head8());
    assert!(
        matches!(&rule, SingleFileRule::BlockShapes { other_block: 0, found, expected, .. }
            if found == &[32, 16] && expected == &[64, 16]),
        "{rule}"
    );

    let mut t = tensors_of("sd35.safetensors");
    let e = t.iter_mut().find(|e| e.0 == "pos_embed").unwrap();
    e.2 = vec![1, 143, 16];
    e.3.truncate(143 * 16 * 4);
    let rule = rule_of(&write(dir.path(), &t), &head8());
    assert_eq!(
        rule,
        SingleFileRule::PosEmbedNotSquare {
            shape: vec![1, 143, 16]
        }
    );

    let mut t = tensors_of("sd35.safetensors");
    t.push((
        "joint_blocks.0.x_block.attn.extra.weight".into(),
        safetensors::Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    let rule = rule_of(&write(dir.path(), &t), &head8());
    assert!(
        matches!(rule, SingleFileRule::UnknownTensor { .. }),
        "{rule}"
    );

    let mut t = tensors_of("sd35.safetensors");
    t.retain(|e| !e.0.starts_with("joint_blocks."));
    let rule = rule_of(&write(dir.path(), &t), &head8());
    assert_eq!(rule, SingleFileRule::NoBlocks);

    // A diffusers-named file on its own: open its folder instead.
    let rule = rule_of(
        &fixture("sd35").join("diffusion_pytorch_model.safetensors"),
        &head8(),
    );
    assert_eq!(rule, SingleFileRule::DiffusersNames);

    // A config whose depth is smaller than the blocks present.
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        std::fs::read_to_string(fixture("sd35").join("config.json"))
            .unwrap()
            .replace("\"num_layers\": 4", "\"num_layers\": 2"),
    )
    .unwrap();
    let rule = rule_of(
        &single("sd35.safetensors"),
        &CheckpointOptions {
            config: Some(cfg),
            head_dim: None,
        },
    );
    assert_eq!(
        rule,
        SingleFileRule::BlockOutsideConfig {
            block: 3,
            num_layers: 2
        }
    );
}

#[test]
fn a_generated_single_file_is_the_generated_folder() {
    use hiprune::compress::{GenerateOptions, Preset, generate_checkpoint, generate_single_file};

    let dir = tempfile::tempdir().unwrap();
    let tiny = Preset::Tiny.config();
    let tiny_x = MmditConfig {
        dual_attention_layers: vec![0, 1],
        qk_norm: Some("rms_norm".into()),
        ..tiny.clone()
    };
    for (what, config) in [("tiny", tiny), ("tiny MMDiT-X", tiny_x)] {
        let head_dim = config.attention_head_dim;
        let opts = GenerateOptions {
            seed: 7,
            ..GenerateOptions::new(config.clone())
        };
        let folder = dir.path().join("folder");
        let file = dir.path().join("single.safetensors");
        generate_checkpoint(&folder, &opts).unwrap();
        let summary = generate_single_file(&file, &opts).unwrap();
        let ck = Checkpoint::open(
            &file,
            &CheckpointOptions {
                config: None,
                head_dim: Some(head_dim),
            },
        )
        .unwrap();
        assert_eq!(
            ck.config,
            MmditConfig {
                sample_size: ck.config.sample_size,
                ..config.clone()
            }
        );
        assert_eq!(summary.tensors, {
            let bytes = std::fs::read(&file).unwrap();
            SafeTensors::deserialize(&bytes).unwrap().len()
        });
        let mut rng = common::seeded_rng("a_generated_single_file_is_the_generated_folder");
        let side = 2 * config.patch_size;
        let hs = Tensor::random_normal(&mut rng, vec![1, config.in_channels, side, side]);
        let ctx = Tensor::random_normal(&mut rng, vec![1, 3, config.joint_attention_dim]);
        let pooled = Tensor::random_normal(&mut rng, vec![1, config.pooled_projection_dim]);
        let t = Tensor::new(vec![500.0], vec![1]).unwrap();
        let inputs = MmditInputs {
            hidden_states: &hs,
            encoder_hidden_states: &ctx,
            pooled_projections: &pooled,
            timestep: &t,
        };
        let from_file = Mmdit::from_checkpoint(CpuBackend::new(), ck)
            .unwrap()
            .forward(&inputs)
            .unwrap();
        let from_folder = Mmdit::load(&folder).unwrap().forward(&inputs).unwrap();
        assert_eq!(from_file, from_folder, "{what}: bitwise equal");
        std::fs::remove_dir_all(&folder).unwrap();
    }
}
