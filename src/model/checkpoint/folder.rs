//! A diffusers transformer folder: `config.json` and `diffusion_pytorch_model.safetensors`,
//! or the shards listed by `diffusion_pytorch_model.safetensors.index.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::model::weights::{MappedWeights, Weights};

/// Name of a single-file diffusers checkpoint.
pub const SINGLE_FILE: &str = "diffusion_pytorch_model.safetensors";
/// Name of the index of a sharded diffusers checkpoint.
pub const SHARD_INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";
/// Largest shard index json accepted (SD3.5 Large's is about 100 KiB).
pub const MAX_INDEX_FILE_BYTES: u64 = 64 << 20;

/// Tensor name to shard file name, as a shard index lists them.
type ShardMap = HashMap<String, String>;

/// The safetensors files of the folder `dir` and, for a sharded checkpoint, the file
/// the index assigns each tensor.
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<ShardMap>)> {
    let index = dir.join(SHARD_INDEX);
    if !index.is_file() {
        return Ok((vec![dir.join(SINGLE_FILE)], None));
    }
    let text = crate::io::read_text_capped(&index, MAX_INDEX_FILE_BYTES)?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::InvalidHeader {
            path: index.clone(),
            reason: e.to_string(),
        })?;
    let map: ShardMap = json
        .get("weight_map")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| Error::InvalidHeader {
            path: index.clone(),
            reason: "no `weight_map` object of tensor name to file name".to_string(),
        })?;
    let names: BTreeSet<&String> = map.values().collect();
    for n in &names {
        if n.contains('/') || n.contains('\\') || n.as_str() == ".." {
            return Err(Error::InvalidHeader {
                path: index.clone(),
                reason: format!("shard name `{n}` is not a plain file name"),
            });
        }
    }
    let files = names.iter().map(|n| dir.join(n)).collect();
    Ok((files, Some(map)))
}

/// Reads the weights of the folder `dir` (memory-mapped: the files must not be
/// modified in place while loaded). Every tensor the index lists must be in the shard
/// it names, and no tensor may be in two shards.
pub(crate) fn read_weights(dir: &Path) -> Result<(Weights, Vec<PathBuf>)> {
    let (files, weight_map) = weight_files(dir)?;
    let mut weights = MappedWeights::new();
    let mut owner: HashMap<String, usize> = HashMap::new();
    for path in &files {
        let file = weights.map(path)?;
        let st =
            SafeTensors::deserialize(weights.bytes(file)).map_err(|e| Error::InvalidHeader {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let tensors: Vec<_> = st
            .iter()
            .map(|(name, view)| {
                let range = weights.range_of(file, view.data());
                (name.to_string(), range, view.dtype(), view.shape().to_vec())
            })
            .collect();
        drop(st);
        for (name, range, dtype, shape) in tensors {
            if owner.insert(name.clone(), file).is_some() {
                return Err(Error::InvalidHeader {
                    path: path.clone(),
                    reason: format!("tensor `{name}` is stored in two shards"),
                });
            }
            weights.add(name, file, range, dtype, shape, false)?;
        }
    }
    if let Some(map) = weight_map {
        for (name, file) in map {
            match owner.get(&name) {
                Some(&i) if files[i].file_name().is_some_and(|f| f == file.as_str()) => {}
                _ => return Err(Error::MissingTensor { tensor: name }),
            }
        }
    }
    Ok((weights.finish(), files))
}
