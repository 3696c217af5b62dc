//! Malformed configs, weights and inputs give typed errors that name the culprit.

use std::collections::HashMap;
use std::path::PathBuf;

use hiprune::Error;
use hiprune::model::{Mmdit, MmditConfig, MmditInputs, PruneSpec, Tensor, TensorFile};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mmdit")
        .join(name)
}

struct Inputs {
    hs: Tensor,
    ehs: Tensor,
    pooled: Tensor,
    t: Tensor,
}

fn fixture_inputs() -> Inputs {
    let f = TensorFile::open(fixture("sd3").join("inputs.safetensors")).unwrap();
    Inputs {
        hs: f.get("hidden_states").unwrap().clone(),
        ehs: f.get("encoder_hidden_states").unwrap().clone(),
        pooled: f.get("pooled_projections").unwrap().clone(),
        t: f.get("timestep").unwrap().clone(),
    }
}

fn forward(model: &Mmdit, i: &Inputs) -> hiprune::Result<Tensor> {
    model.forward(&MmditInputs {
        hidden_states: &i.hs,
        encoder_hidden_states: &i.ehs,
        pooled_projections: &i.pooled,
        timestep: &i.t,
    })
}

fn filled(shape: Vec<usize>, v: f32) -> Tensor {
    Tensor::new(vec![v; shape.iter().product()], shape).unwrap()
}

#[test]
fn bad_inputs_name_the_tensor() {
    let model = Mmdit::load(fixture("sd3")).unwrap();
    assert!(forward(&model, &fixture_inputs()).is_ok());

    // Wrong channel count.
    let mut i = fixture_inputs();
    i.hs = filled(vec![2, 3, 8, 6], 0.5);
    match forward(&model, &i).unwrap_err() {
        Error::ShapeMismatch { tensor, .. } => assert_eq!(tensor, "hidden_states"),
        e => panic!("{e}"),
    }
    // Latent side not divisible by the patch.
    let mut i = fixture_inputs();
    i.hs = filled(vec![2, 4, 7, 6], 0.5);
    let e = forward(&model, &i).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains("hidden_states"),
        "{e}"
    );
    // More patches than the 12 x 12 positional table.
    let mut i = fixture_inputs();
    i.hs = filled(vec![2, 4, 26, 2], 0.5);
    let e = forward(&model, &i).unwrap_err();
    assert!(e.to_string().contains("positional table"), "{e}");
    // Batch mismatch.
    let mut i = fixture_inputs();
    i.pooled = filled(vec![1, 12], 0.5);
    match forward(&model, &i).unwrap_err() {
        Error::ShapeMismatch {
            tensor, expected, ..
        } => {
            assert_eq!(tensor, "pooled_projections");
            assert_eq!(expected, vec![2, 12]);
        }
        e => panic!("{e}"),
    }
    let mut i = fixture_inputs();
    i.t = filled(vec![3], 1.0);
    assert!(
        forward(&model, &i)
            .unwrap_err()
            .to_string()
            .contains("`timestep`")
    );
    // Wrong embedding width.
    let mut i = fixture_inputs();
    i.ehs = filled(vec![2, 5, 23], 0.5);
    assert!(
        forward(&model, &i)
            .unwrap_err()
            .to_string()
            .contains("`encoder_hidden_states`")
    );
    // NaN and infinity.
    let mut i = fixture_inputs();
    i.ehs.data[17] = f32::NAN;
    let e = forward(&model, &i).unwrap_err();
    assert!(
        e.to_string().contains("encoder_hidden_states") && e.to_string().contains("element 17"),
        "{e}"
    );
    let mut i = fixture_inputs();
    i.t.data[1] = f32::INFINITY;
    assert!(
        forward(&model, &i)
            .unwrap_err()
            .to_string()
            .contains("`timestep`")
    );
}

#[test]
fn missing_input_tensor_is_named() {
    let f = TensorFile::open(fixture("sd3").join("inputs.safetensors")).unwrap();
    match f.get("latent").unwrap_err() {
        Error::MissingTensor { tensor } => assert_eq!(tensor, "latent"),
        e => panic!("{e}"),
    }
}

#[test]
fn bad_configs_are_rejected() {
    let base = std::fs::read_to_string(fixture("mmditx").join("config.json")).unwrap();
    let cfg = MmditConfig::from_json(&base).unwrap();
    assert_eq!(cfg.dual_attention_layers, vec![0, 1]);
    assert_eq!(cfg.qk_norm.as_deref(), Some("rms_norm"));
    let with = |k: &str, v: serde_json::Value| {
        let mut j: serde_json::Value = serde_json::from_str(&base).unwrap();
        j[k] = v;
        MmditConfig::from_json(&j.to_string())
    };
    let cases = [
        ("qk_norm", serde_json::json!("layer_norm"), "qk_norm"),
        (
            "caption_projection_dim",
            serde_json::json!(24),
            "caption_projection_dim",
        ),
        ("patch_size", serde_json::json!(3), "patch_size"),
        (
            "dual_attention_layers",
            serde_json::json!([0, 4]),
            "dual_attention_layers",
        ),
        ("num_layers", serde_json::json!(0), "num_layers"),
    ];
    for (k, v, field) in cases {
        let e = with(k, v).unwrap_err();
        assert!(e.to_string().contains(field), "{k}: {e}");
    }
    assert!(
        with("qk_norm", serde_json::Value::Null)
            .unwrap()
            .qk_norm
            .is_none()
    );
    assert!(MmditConfig::from_json("{ not json").is_err());
}

/// Writes a copy of the sd3 folder whose safetensors file is changed by `edit`.
fn edited_sd3(
    edit: impl Fn(&mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("sd3").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(fixture("sd3").join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                (v.dtype(), v.shape().to_vec(), v.data().to_vec()),
            )
        })
        .collect();
    edit(&mut map);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = map
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(
        views,
        None,
        &dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    dir
}

#[test]
fn bad_weights_name_the_tensor() {
    let name = "transformer_blocks.1.attn.to_k.weight";
    let dir = edited_sd3(|m| {
        m.remove(name);
    });
    match Mmdit::load(dir.path()).unwrap_err() {
        Error::MissingTensor { tensor } => assert_eq!(tensor, name),
        e => panic!("{e}"),
    }
    // Not needed once block 1 is pruned away: load the rest and prune explicitly.
    let weights = hiprune::model::Weights::from_folder(dir.path()).unwrap();
    let cfg = MmditConfig::from_file(dir.path().join("config.json")).unwrap();
    assert!(Mmdit::new(cfg, weights, PruneSpec::remove_blocks([1])).is_ok());

    let dir = edited_sd3(|m| {
        let e = m.get_mut("norm_out.linear.weight").unwrap();
        e.1 = vec![16, 32];
    });
    match Mmdit::load(dir.path()).unwrap_err() {
        Error::ShapeMismatch {
            tensor,
            expected,
            found,
        } => {
            assert_eq!(tensor, "norm_out.linear.weight");
            assert_eq!((expected, found), (vec![32, 16], vec![16, 32]));
        }
        e => panic!("{e}"),
    }

    let dir = edited_sd3(|m| {
        let e = m.get_mut("pos_embed.pos_embed").unwrap();
        e.0 = safetensors::Dtype::I32;
    });
    match Mmdit::load(dir.path()).unwrap_err() {
        Error::DtypeMismatch { tensor, .. } => assert_eq!(tensor, "pos_embed.pos_embed"),
        e => panic!("{e}"),
    }
}

#[test]
fn bad_prune_specs_are_rejected() {
    let mut model = Mmdit::load(fixture("sd3")).unwrap();
    assert!(model.set_prune(PruneSpec::remove_blocks([3])).is_err());
    let mut spec = PruneSpec::none();
    assert!(spec.remove_component(0, "attn3").is_err());
    assert!(PruneSpec::parse_block_list("1,x").is_err());
    assert_eq!(
        PruneSpec::parse_block_list(" 2, 0 ")
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        vec![0, 2]
    );
    // A spec round-trips through JSON.
    spec.remove_component(1, "ff_context").unwrap();
    spec.removed_blocks.insert(2);
    let back: PruneSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
    assert_eq!(back, spec);
    // Removing every block still runs (embedding + output head only).
    model
        .set_prune(PruneSpec::remove_blocks([0, 1, 2]))
        .unwrap();
    assert!(forward(&model, &fixture_inputs()).is_ok());
}
