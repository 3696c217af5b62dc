//! [`Tensor`], an owned f32 array with a shape, and safetensors files of them: reading
//! validated inputs ([`TensorFile`]) and writing outputs atomically
//! ([`write_tensors`]).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};

/// An owned f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The elements, `shape.iter().product()` of them.
    pub data: Vec<f32>,
    /// The shape.
    pub shape: Vec<usize>,
}

impl Tensor {
    /// A tensor after checking that `data` fills `shape`.
    pub fn new(data: Vec<f32>, shape: Vec<usize>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::length(
                format!("tensor of shape {shape:?}"),
                n,
                data.len(),
            ));
        }
        Ok(Tensor { data, shape })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        Tensor {
            data: vec![0.0; shape.iter().product()],
            shape,
        }
    }

    /// A `[shape]` tensor of seeded, roughly N(0, 1) values (the sum of four uniforms in
    /// `[-1, 1)`, scaled to unit variance): synthetic inputs for demos, benchmarks and
    /// calibration without data.
    pub fn random_normal(rng: &mut impl rand::Rng, shape: Vec<usize>) -> Self {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|_| (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>() * 0.866)
            .collect();
        Tensor { data, shape }
    }
}

/// A safetensors file read into memory and validated by the safetensors parser.
pub struct TensorFile {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl std::fmt::Debug for TensorFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Largest inputs / latent file accepted by [`TensorFile::open`] (1 GiB: a batch of 16
/// SD3.5 latents at 2048 x 2048 with 333 context tokens is under 100 MiB).
pub const MAX_INPUT_FILE_BYTES: u64 = 1 << 30;

impl TensorFile {
    /// Reads `path`, converting every F32/F16/BF16 tensor to f32; other dtypes are an
    /// [`Error::DtypeMismatch`]. Files over [`MAX_INPUT_FILE_BYTES`] are refused before
    /// they are read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bytes = crate::io::read_capped(&path, MAX_INPUT_FILE_BYTES)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::InvalidHeader {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut tensors = HashMap::new();
        for (name, view) in st.iter() {
            let data = floats_to_f32(name, view.dtype(), view.data())?;
            tensors.insert(name.to_string(), Tensor::new(data, view.shape().to_vec())?);
        }
        Ok(TensorFile { path, tensors })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, or [`Error::MissingTensor`].
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            tensor: name.to_string(),
        })
    }

    /// Takes the tensor `name` out of the file, or [`Error::MissingTensor`].
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors
            .remove(name)
            .ok_or_else(|| Error::MissingTensor {
                tensor: name.to_string(),
            })
    }
}

/// Converts little-endian F32/F16/BF16 bytes to f32.
pub(crate) fn floats_to_f32(name: &str, dtype: StDtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let out = match dtype {
        StDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::DtypeMismatch {
                tensor: name.to_string(),
                expected: "F32, F16 or BF16".to_string(),
                found: format!("{other:?}"),
            });
        }
    };
    Ok(out)
}

/// Writes `tensors` as F32 to the safetensors file `path` atomically: a temporary file
/// in the same folder, synced, then renamed over `path`.
pub fn write_tensors(path: impl AsRef<Path>, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let path = path.as_ref();
    let views = tensors
        .iter()
        .map(|(name, t)| {
            let view = safetensors::tensor::TensorView::new(
                StDtype::F32,
                t.shape.clone(),
                bytemuck::cast_slice(&t.data),
            )
            .map_err(|e| Error::invalid(format!("tensor `{name}`"), e.to_string()))?;
            Ok((name.to_string(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::invalid("output file", e.to_string()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| Error::io(&dir, e))?;
    tmp.write_all(&bytes)
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}
