//! `compress_checkpoint`: parity with the engine's run-time pruning, INT4 size and
//! accuracy, and bad inputs (typed errors, nothing left at the output path).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hiprune::Error;
use hiprune::compress::{
    CompressOptions, GenerateOptions, Preset, WeightFormat, compress_checkpoint,
    generate_checkpoint,
};
use hiprune::format::{Dtype, Precision};
use hiprune::model::{Mmdit, MmditConfig, MmditInputs, PruneSpec, Tensor, TensorFile};
use hiprune::{Package, model::write_tensors};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mmdit")
        .join(name)
}

fn compress(
    src: &Path,
    dst: &Path,
    opts: &CompressOptions,
) -> hiprune::Result<hiprune::compress::CompressSummary> {
    compress_checkpoint(src, dst, opts, &mut |_| {})
}

fn random(rng: &mut StdRng, shape: Vec<usize>) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor {
        data: (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
        shape,
    }
}

struct Inputs {
    hs: Tensor,
    ehs: Tensor,
    pooled: Tensor,
    t: Tensor,
}

impl Inputs {
    fn new(cfg: &MmditConfig, seed: u64, batch: usize, side: usize, tokens: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        Inputs {
            hs: random(&mut rng, vec![batch, cfg.in_channels, side, side]),
            ehs: random(&mut rng, vec![batch, tokens, cfg.joint_attention_dim]),
            pooled: random(&mut rng, vec![batch, cfg.pooled_projection_dim]),
            t: Tensor {
                data: (0..batch)
                    .map(|_| rng.random_range(1.0f32..1000.0))
                    .collect(),
                shape: vec![batch],
            },
        }
    }

    fn get(&self) -> MmditInputs<'_> {
        MmditInputs {
            hidden_states: &self.hs,
            encoder_hidden_states: &self.ehs,
            pooled_projections: &self.pooled,
            timestep: &self.t,
        }
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (d / n).sqrt()
}

#[test]
fn f32_package_matches_engine_pruning_on_fixture() {
    let src = fixture("sd35");
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("model.hpk");
    let opts = CompressOptions {
        weights: WeightFormat::F32,
        spec: PruneSpec::remove_blocks([1]),
        ..CompressOptions::default()
    };
    let summary = compress(&src, &dst, &opts).unwrap();
    assert_eq!(summary.kept_blocks, vec![0, 2, 3]);
    assert_eq!(summary.quantized_layers, 0);

    let package = Mmdit::load(&dst).unwrap();
    let mut engine = Mmdit::load(&src).unwrap();
    engine.set_prune(PruneSpec::remove_blocks([1])).unwrap();
    let file = TensorFile::open(src.join("inputs.safetensors")).unwrap();
    let inputs = MmditInputs {
        hidden_states: file.get("hidden_states").unwrap(),
        encoder_hidden_states: file.get("encoder_hidden_states").unwrap(),
        pooled_projections: file.get("pooled_projections").unwrap(),
        timestep: file.get("timestep").unwrap(),
    };
    let a = package.forward(&inputs).unwrap();
    let b = engine.forward(&inputs).unwrap();
    assert_eq!(a.shape, b.shape);
    let max = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(max <= 1e-6, "max abs difference {max}");
    // The removed block's tensors are not in the package.
    let p = Package::open(&dst).unwrap();
    assert!(
        p.tensor_names()
            .all(|n| !n.starts_with("transformer_blocks.1."))
    );
    assert!(p.contains("transformer_blocks.2.attn.to_q.weight"));
    assert_eq!(p.manifest().kept_blocks, vec![0, 2, 3]);
}

#[test]
fn int4_package_is_smaller_and_close_to_dense() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("ckpt");
    let mut cfg = Preset::Tiny.config();
    cfg.num_layers = 3;
    generate_checkpoint(
        &src,
        &GenerateOptions {
            f16: true,
            seed: 11,
            max_shard_bytes: 200_000, // several shards
            ..GenerateOptions::new(cfg.clone())
        },
    )
    .unwrap();
    let dst = dir.path().join("q.hpk");
    let summary = compress(&src, &dst, &CompressOptions::default()).unwrap();
    assert!(
        summary.dense_layers.is_empty(),
        "{:?}",
        summary.dense_layers
    );
    assert!(
        summary.output_bytes * 5 < summary.source_bytes * 2,
        "{} vs {}",
        summary.output_bytes,
        summary.source_bytes
    );
    assert_eq!(summary.output_bytes, std::fs::metadata(&dst).unwrap().len());

    let p = Package::open(&dst).unwrap();
    p.verify().unwrap();
    let m = p.manifest();
    // `--weights int4` is symmetric INT4; the generated positional table is diffusers'
    // sin-cos table, so it is computed at load, not stored.
    for l in &m.layers {
        if l.name == "pos_embed.pos_embed" {
            assert!(
                matches!(
                    l.precision,
                    Precision::Sincos2d {
                        source: Dtype::F16,
                        dtype: Dtype::F16,
                        ..
                    }
                ),
                "{:?}",
                l.precision
            );
        } else {
            assert_eq!(l.precision, Precision::Int4Sym { group: 64 }, "{}", l.name);
            assert!(!p.contains(&format!("{}.offsets", l.name)));
        }
    }
    assert!(!p.contains("pos_embed.pos_embed"));
    assert_eq!(
        p.tensor("transformer_blocks.0.attn.norm_q.weight")
            .unwrap()
            .dtype(),
        Dtype::F16
    );
    assert_eq!(p.tensor("proj_out.bias").unwrap().dtype(), Dtype::F32);
    assert_eq!(m.architecture.as_ref(), Some(&cfg));
    assert_eq!(m.provenance.source, "ckpt");
    assert_eq!(m.provenance.source_bytes, summary.source_bytes);
    assert!(m.provenance.quantizer.contains("int4 rtn-symmetric"));

    let dense = Mmdit::load(&src).unwrap();
    let q = Mmdit::load(&dst).unwrap();
    let inputs = Inputs::new(&cfg, 5, 2, 6, 5);
    let a = dense.forward(&inputs.get()).unwrap();
    let b = q.forward(&inputs.get()).unwrap();
    let err = rel_l2(&a.data, &b.data);
    eprintln!("int4 relative error {err}");
    assert!(err > 0.0 && err < 0.35, "relative error {err}");

    // The asymmetric layout (scale and offset per group) loads and runs too; it is
    // larger by 2 bytes per group.
    let dst_asym = dir.path().join("asym.hpk");
    let s_asym = compress(
        &src,
        &dst_asym,
        &CompressOptions {
            weights: WeightFormat::Int4Asym,
            ..CompressOptions::default()
        },
    )
    .unwrap();
    let pa = Package::open(&dst_asym).unwrap();
    pa.verify().unwrap();
    let n_q4 = pa
        .manifest()
        .layers
        .iter()
        .filter(|l| l.precision == Precision::Int4 { group: 64 })
        .count();
    assert_eq!(n_q4, summary.quantized_layers);
    assert!(
        pa.manifest()
            .provenance
            .quantizer
            .contains("rtn-asymmetric")
    );
    let groups: u64 = pa
        .manifest()
        .layers
        .iter()
        .filter(|l| l.precision.q4().is_some())
        .map(|l| l.out_features * l.in_features / 64)
        .sum();
    assert!(s_asym.output_bytes >= summary.output_bytes + 2 * groups);
    let b_asym = Mmdit::load(&dst_asym)
        .unwrap()
        .forward(&inputs.get())
        .unwrap();
    let err_asym = rel_l2(&a.data, &b_asym.data);
    eprintln!("int4-asym relative error {err_asym}");
    assert!(
        err_asym > 0.0 && err_asym < 0.35,
        "relative error {err_asym}"
    );

    // NF4 too, and it stays close as well.
    let dst2 = dir.path().join("nf4.hpk");
    let s2 = compress(
        &src,
        &dst2,
        &CompressOptions {
            weights: WeightFormat::Nf4,
            ..CompressOptions::default()
        },
    )
    .unwrap();
    assert!(s2.output_bytes < summary.output_bytes);
    let b2 = Mmdit::load(&dst2).unwrap().forward(&inputs.get()).unwrap();
    let err2 = rel_l2(&a.data, &b2.data);
    eprintln!("nf4 relative error {err2}");
    assert!(err2 < 0.35, "nf4 relative error {err2}");
    // An f16 package of the f16 checkpoint is (all but) exact: the error above is the
    // 4-bit weights', not the exporter's.
    let dst3 = dir.path().join("f16.hpk");
    compress(
        &src,
        &dst3,
        &CompressOptions {
            weights: WeightFormat::F16,
            ..CompressOptions::default()
        },
    )
    .unwrap();
    let b3 = Mmdit::load(&dst3).unwrap().forward(&inputs.get()).unwrap();
    let err3 = rel_l2(&a.data, &b3.data);
    assert!(err3 < 1e-5, "f16 relative error {err3}");
}

#[test]
fn layers_whose_k_the_group_does_not_divide_stay_f16() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("ckpt");
    let mut cfg = Preset::Tiny.config();
    cfg.num_layers = 2;
    cfg.pooled_projection_dim = 48; // text_embedder.linear_1 has K = 48
    generate_checkpoint(
        &src,
        &GenerateOptions {
            f16: false,
            seed: 2,
            ..GenerateOptions::new(cfg.clone())
        },
    )
    .unwrap();
    let dst = dir.path().join("q.hpk");
    let s = compress(&src, &dst, &CompressOptions::default()).unwrap();
    assert_eq!(s.dense_layers.len(), 1);
    assert_eq!(
        s.dense_layers[0].0,
        "time_text_embed.text_embedder.linear_1"
    );
    assert!(
        s.dense_layers[0].1.contains("48"),
        "{}",
        s.dense_layers[0].1
    );
    let p = Package::open(&dst).unwrap();
    assert_eq!(
        p.layer("time_text_embed.text_embedder.linear_1")
            .unwrap()
            .precision,
        Precision::F16
    );
    // Protected blocks kept in f16 on request.
    let dst2 = dir.path().join("p.hpk");
    let s2 = compress(
        &src,
        &dst2,
        &CompressOptions {
            dense_blocks: [0].into_iter().collect(),
            ..CompressOptions::default()
        },
    )
    .unwrap();
    let p2 = Package::open(&dst2).unwrap();
    assert_eq!(
        p2.layer("transformer_blocks.0.ff.net.2").unwrap().precision,
        Precision::F16
    );
    assert_eq!(
        p2.layer("transformer_blocks.1.ff.net.2").unwrap().precision,
        Precision::Int4Sym { group: 64 }
    );
    assert!(s2.output_bytes > s.output_bytes);
    Mmdit::load(&dst2).unwrap();
}

/// A single-file f32 checkpoint of `cfg` with the tensors of a generated one, edited.
fn edited_checkpoint(
    root: &Path,
    name: &str,
    edit: impl FnOnce(&mut HashMap<String, Tensor>, &mut MmditConfig),
) -> PathBuf {
    let gen_dir = root.join(format!("{name}-gen"));
    let mut cfg = Preset::Tiny.config();
    cfg.num_layers = 2;
    let g = generate_checkpoint(
        &gen_dir,
        &GenerateOptions {
            f16: false,
            ..GenerateOptions::new(cfg.clone())
        },
    )
    .unwrap();
    let mut file = TensorFile::open(&g.shards[0]).unwrap();
    let names: Vec<String> = {
        let text =
            std::fs::read_to_string(gen_dir.join("diffusion_pytorch_model.safetensors.index.json"))
                .unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["weight_map"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    let mut tensors: HashMap<String, Tensor> = names
        .iter()
        .map(|n| (n.clone(), file.take(n).unwrap()))
        .collect();
    edit(&mut tensors, &mut cfg);
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let list: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_tensors(dir.join("diffusion_pytorch_model.safetensors"), &list).unwrap();
    std::fs::write(
        dir.join("config.json"),
        hiprune::compress::generate::config_json(&cfg),
    )
    .unwrap();
    dir
}

fn assert_nothing_written(out_dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn bad_checkpoints_give_typed_errors_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dst = out.join("model.hpk");
    let opts = CompressOptions::default();

    let missing = edited_checkpoint(dir.path(), "missing", |t, _| {
        t.remove("transformer_blocks.1.ff.net.2.weight").unwrap();
    });
    match compress(&missing, &dst, &opts) {
        Err(Error::MissingTensor { tensor }) => {
            assert_eq!(tensor, "transformer_blocks.1.ff.net.2.weight")
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    assert_nothing_written(&out);

    // A misshapen tensor (transposed), late in the model.
    let misshapen = edited_checkpoint(dir.path(), "misshapen", |t, _| {
        let w = t
            .get_mut("transformer_blocks.1.ff.net.0.proj.weight")
            .unwrap();
        w.shape.reverse();
    });
    match compress(&misshapen, &dst, &opts) {
        Err(Error::ShapeMismatch { tensor, .. }) => {
            assert_eq!(tensor, "transformer_blocks.1.ff.net.0.proj.weight")
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    assert_nothing_written(&out);

    // A misshapen plain tensor (checked while streaming).
    let plain = edited_checkpoint(dir.path(), "plain", |t, _| {
        let w = t
            .get_mut("transformer_blocks.1.attn.norm_k.weight")
            .unwrap();
        w.data.push(1.0);
        w.shape = vec![w.data.len()];
    });
    match compress(&plain, &dst, &opts) {
        Err(Error::ShapeMismatch { tensor, .. }) => {
            assert_eq!(tensor, "transformer_blocks.1.attn.norm_k.weight")
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    assert_nothing_written(&out);

    // The config says 3 blocks, the weights hold 2.
    let config = edited_checkpoint(dir.path(), "config", |_, cfg| cfg.num_layers = 3);
    // (block 1 is no longer the last one, so its context modulation is 6D wide)
    match compress(&config, &dst, &opts) {
        Err(Error::ShapeMismatch { tensor, .. }) => {
            assert_eq!(tensor, "transformer_blocks.1.norm1_context.linear.weight")
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    // The config says a wider model.
    let wide = edited_checkpoint(dir.path(), "wide", |_, cfg| {
        cfg.num_attention_heads = 3;
        cfg.caption_projection_dim = 96;
    });
    assert!(matches!(
        compress(&wide, &dst, &opts),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_nothing_written(&out);

    // A non-finite weight is named.
    let nan = edited_checkpoint(dir.path(), "nan", |t, _| {
        t.get_mut("transformer_blocks.0.attn.to_v.weight")
            .unwrap()
            .data[70] = f32::NAN;
    });
    match compress(&nan, &dst, &opts) {
        Err(Error::InvalidArgument { what, reason }) => {
            assert!(
                what.contains("transformer_blocks.0.attn.to_v.weight"),
                "{what}"
            );
            assert!(what.contains("row 1"), "{what}");
            assert!(reason.contains("NaN"), "{reason}");
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert_nothing_written(&out);

    // Bad options.
    match compress(
        &fixture("sd35"),
        &dst,
        &CompressOptions {
            group: 48,
            ..CompressOptions::default()
        },
    ) {
        // The option at fault, and the sizes that would do.
        Err(Error::InvalidArgument { what, reason }) => {
            assert_eq!(what, "group");
            assert!(reason.contains("[32, 64, 128]"), "{reason}");
        }
        other => panic!("expected InvalidArgument for the group, got {other:?}"),
    }
    assert!(
        compress(
            &fixture("sd35"),
            &dst,
            &CompressOptions {
                spec: PruneSpec::remove_blocks([7]),
                ..CompressOptions::default()
            }
        )
        .is_err()
    );
    // sd35 has no dual-attention block: an attn2 cut is refused before anything is
    // written (cuts of existing sub-components are tests/component_cuts.rs's).
    let mut masked = PruneSpec::none();
    masked.remove_component(1, "attn2").unwrap();
    assert!(matches!(
        compress(
            &fixture("sd35"),
            &dst,
            &CompressOptions {
                spec: masked,
                ..CompressOptions::default()
            }
        ),
        Err(Error::InvalidArgument { .. })
    ));
    assert_nothing_written(&out);
}

#[test]
fn output_paths_that_cannot_be_written_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("sd35");
    let opts = CompressOptions {
        weights: WeightFormat::F16,
        ..CompressOptions::default()
    };
    // A folder that does not exist.
    let missing = dir.path().join("no/such/folder/model.hpk");
    assert!(matches!(
        compress(&src, &missing, &opts),
        Err(Error::Io { .. })
    ));
    assert!(!missing.exists());
    assert!(!dir.path().join("no").exists());
    // A "folder" that is a regular file.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = file.join("model.hpk");
    assert!(matches!(
        compress(&src, &under_file, &opts),
        Err(Error::Io { .. })
    ));
    // An existing folder at the output path.
    let folder = dir.path().join("taken");
    std::fs::create_dir(&folder).unwrap();
    assert!(compress(&src, &folder, &opts).is_err());
    assert!(folder.is_dir());
    assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 0);
    // The missing source folder.
    assert!(matches!(
        compress(
            &dir.path().join("nothing"),
            &dir.path().join("x.hpk"),
            &opts
        ),
        Err(Error::Io { .. })
    ));
    assert!(!dir.path().join("x.hpk").exists());
}

#[test]
fn existing_output_is_replaced_only_on_success() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("model.hpk");
    std::fs::write(&dst, b"previous package").unwrap();
    let missing = edited_checkpoint(dir.path(), "missing", |t, _| {
        t.remove("proj_out.bias").unwrap();
    });
    assert!(compress(&missing, &dst, &CompressOptions::default()).is_err());
    assert_eq!(std::fs::read(&dst).unwrap(), b"previous package");
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            n.to_string_lossy().starts_with('.')
        })
        .count();
    assert_eq!(leftovers, 0, "temp files left behind");

    compress(&fixture("sd35"), &dst, &CompressOptions::default()).unwrap();
    let p = Package::open(&dst).unwrap();
    assert_eq!(p.manifest().kept_blocks, vec![0, 1, 2, 3]);
}

/// The forward of a package against the diffusers folder it came from, bit for bit.
fn assert_bitwise_forward(package: &Path, folder: &Path) {
    let file = TensorFile::open(folder.join("inputs.safetensors")).unwrap();
    let inputs = MmditInputs {
        hidden_states: file.get("hidden_states").unwrap(),
        encoder_hidden_states: file.get("encoder_hidden_states").unwrap(),
        pooled_projections: file.get("pooled_projections").unwrap(),
        timestep: file.get("timestep").unwrap(),
    };
    let a = Mmdit::load(package).unwrap().forward(&inputs).unwrap();
    let b = Mmdit::load(folder).unwrap().forward(&inputs).unwrap();
    assert_eq!(a.shape, b.shape);
    let bits = |t: &Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b), "{}", folder.display());
}

/// Every fixture's table is diffusers' sin-cos table: a dense package stores no bytes
/// for it, records it as computed, and runs bit for bit like the diffusers folder.
#[test]
fn fixture_tables_are_computed_not_stored_and_forward_is_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    // The f16 checkpoint is packaged in f16, so that its linears run the same f16
    // kernel as the folder's (an f32 copy would sum in another order).
    for (name, weights, source, dtype) in [
        ("sd3", WeightFormat::F32, Dtype::F32, Dtype::F32),
        ("sd35", WeightFormat::F32, Dtype::F32, Dtype::F32),
        ("mmditx", WeightFormat::F32, Dtype::F32, Dtype::F32),
        ("sd35_sharded", WeightFormat::F32, Dtype::F32, Dtype::F32),
        ("sd3_f16", WeightFormat::F16, Dtype::F16, Dtype::F16),
    ] {
        let src = fixture(name);
        let dst = dir.path().join(format!("{name}.hpk"));
        let opts = CompressOptions {
            weights,
            ..CompressOptions::default()
        };
        compress(&src, &dst, &opts).unwrap();
        let p = Package::open(&dst).unwrap();
        assert!(!p.contains("pos_embed.pos_embed"), "{name}");
        let entry = p.layer("pos_embed.pos_embed").unwrap();
        assert_eq!(
            entry.precision,
            Precision::Sincos2d {
                grid: 12,
                base_size: 4,
                source,
                dtype,
            },
            "{name}"
        );
        assert_eq!((entry.out_features, entry.in_features), (144, 16));
        assert!(entry.tensor_names().is_empty());
        drop(p);
        assert_bitwise_forward(&dst, &src);
    }
}

/// A table that differs from the sin-cos one in a single element is stored as before,
/// and the package's forward still equals the folder's.
#[test]
fn a_table_differing_in_one_element_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("sd35");
    let edited = dir.path().join("edited");
    std::fs::create_dir_all(&edited).unwrap();
    std::fs::copy(src.join("config.json"), edited.join("config.json")).unwrap();
    std::fs::copy(
        src.join("inputs.safetensors"),
        edited.join("inputs.safetensors"),
    )
    .unwrap();
    let weights = src.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let mut file = TensorFile::open(&weights).unwrap();
    let mut tensors: Vec<(String, Tensor)> = names
        .iter()
        .map(|n| (n.clone(), file.take(n).unwrap()))
        .collect();
    let mut rng = StdRng::seed_from_u64(0x7ab1e);
    let table = tensors
        .iter_mut()
        .find(|(n, _)| n == "pos_embed.pos_embed")
        .unwrap();
    let i = rng.random_range(0..table.1.data.len());
    // One ulp off: still a plausible table, no longer the computed one.
    table.1.data[i] = f32::from_bits(table.1.data[i].to_bits() + 1);
    let edited_value = table.1.data[i];
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_tensors(edited.join("diffusion_pytorch_model.safetensors"), &refs).unwrap();

    for weights in [WeightFormat::F32, WeightFormat::Int4] {
        let dst = dir.path().join(format!("{weights}.hpk"));
        let opts = CompressOptions {
            weights,
            ..CompressOptions::default()
        };
        compress(&edited, &dst, &opts).unwrap();
        let p = Package::open(&dst).unwrap();
        assert!(p.contains("pos_embed.pos_embed"), "{weights}");
        assert!(p.layer("pos_embed.pos_embed").is_err());
        if weights == WeightFormat::F32 {
            let stored = p
                .tensor("pos_embed.pos_embed")
                .unwrap()
                .to_f32_vec()
                .unwrap();
            assert_eq!(stored[i].to_bits(), edited_value.to_bits());
            drop(p);
            assert_bitwise_forward(&dst, &edited);
        }
    }
}
