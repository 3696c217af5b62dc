//! Resource caps: files that are, or declare, absurd sizes are refused before any
//! allocation of that size, with a typed error.

use hiprune::Error;
use hiprune::config::{MAX_CONFIG_FILE_BYTES, MAX_LAYERS};
use hiprune::model::checkpoint::MAX_INDEX_FILE_BYTES;
use hiprune::model::tensor::MAX_INPUT_FILE_BYTES;
use hiprune::model::{MmditConfig, TensorFile, Weights};

/// A sparse file of `len` bytes: no disk space, no memory.
fn sparse_file(path: &std::path::Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

#[test]
fn oversized_config_json_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    sparse_file(&path, MAX_CONFIG_FILE_BYTES + 1);
    let err = MmditConfig::from_file(&path).unwrap_err();
    assert!(
        matches!(err, Error::FileTooLarge { len, .. } if len == MAX_CONFIG_FILE_BYTES + 1),
        "{err}"
    );
}

#[test]
fn oversized_shard_index_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    sparse_file(
        &dir.path()
            .join("diffusion_pytorch_model.safetensors.index.json"),
        MAX_INDEX_FILE_BYTES + 1,
    );
    let err = Weights::from_folder(dir.path()).unwrap_err();
    assert!(matches!(err, Error::FileTooLarge { .. }), "{err}");
}

#[test]
fn oversized_inputs_file_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inputs.safetensors");
    sparse_file(&path, MAX_INPUT_FILE_BYTES + 1);
    let err = TensorFile::open(&path).unwrap_err();
    assert!(matches!(err, Error::FileTooLarge { .. }), "{err}");
}

#[test]
fn absurd_config_sizes_are_refused() {
    let base = MmditConfig::sd35_medium();
    let mut cfg = base.clone();
    cfg.num_layers = MAX_LAYERS + 1;
    assert!(matches!(
        cfg.validate().unwrap_err(),
        Error::InvalidArgument { .. }
    ));
    let mut cfg = base.clone();
    cfg.joint_attention_dim = 1 << 40;
    assert!(matches!(
        cfg.validate().unwrap_err(),
        Error::InvalidArgument { .. }
    ));
    let mut cfg = base;
    cfg.num_attention_heads = usize::MAX / 2;
    assert!(
        cfg.validate().is_err(),
        "heads x head_dim overflow or the cap"
    );
}

#[test]
fn a_checkpoint_declaring_a_2_pow_60_byte_tensor_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let header = br#"{"w":{"dtype":"F32","shape":[268435456,1073741824],"data_offsets":[0,1152921504606846976]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 64]);
    std::fs::write(
        dir.path().join("diffusion_pytorch_model.safetensors"),
        &bytes,
    )
    .unwrap();
    let err = Weights::from_folder(dir.path()).unwrap_err();
    assert!(matches!(err, Error::InvalidHeader { .. }), "{err}");
}
