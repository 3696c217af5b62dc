//! Import of NF4 layers saved by bitsandbytes (`Linear4bit` / `Params4bit`).
//!
//! A bitsandbytes 4-bit weight `<w>` (for example
//! `transformer_blocks.0.attn.to_q.weight`) is saved as these safetensors entries:
//!
//! - `<w>`: `U8`, shape `[ceil(N*K/2), 1]`, the codes of the row-major flattened
//!   `[N, K]` weight, two per byte, the *first* element of each pair in the *high*
//!   nibble.
//! - `<w>.quant_map`: `F32 [16]`, the codebook (NF4 or FP4).
//! - `<w>.quant_state.bitsandbytes__nf4` (or `__fp4`): `U8`, UTF-8 JSON with
//!   `quant_type`, `blocksize`, `dtype`, `shape` and, when the statistics are double
//!   quantised, `nested_blocksize`, `nested_dtype` and `nested_offset`.
//! - `<w>.absmax`: one absmax per block of `blocksize` flattened elements; `F32` when
//!   plain. When double quantised it holds `U8` codes instead, decoded as
//!   `nested_quant_map[code] * nested_absmax[block / nested_blocksize] + nested_offset`
//!   in f32, with `<w>.nested_absmax` (`F32`, one per nested block, the last one may be
//!   partial) and `<w>.nested_quant_map` (`F32 [256]`).
//!
//! The dequantised weight is `absmax[i / blocksize] * quant_map[code_i]`.
//!
//! The import converts this into the canonical [`Q4Kind::Nf4`] layout: nibbles swapped
//! to low-first, absmax rounded to f16 per block. A block must not cross a row
//! (`K % blocksize == 0`). Block sizes above 128 (all multiples of 128) become groups of
//! 128 that repeat the block's absmax, which is exact. Every dtype, shape and length is
//! checked before any indexing.

use half::f16;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::{NF4_BLOCK_SIZES, NF4_CODEBOOK, Q4Kind, Q4Matrix};
use crate::error::{Error, Result};

/// Block sizes bitsandbytes accepts for 4-bit quantisation.
const BNB_BLOCK_SIZES: &[usize] = &[32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The FP4 codebook of bitsandbytes, recognised only to reject it with a clear error.
const BNB_FP4_FIRST_LEVELS: [f32; 4] = [0.0, 0.005_208_333_5, 0.666_666_7, 1.0];

/// The non-tensor fields of a bitsandbytes quant state (the JSON entry).
#[derive(Debug, serde::Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    shape: Option<Vec<usize>>,
    nested_blocksize: Option<usize>,
    nested_offset: Option<f64>,
}

/// Looks up `name`, mapping "not found" to [`Error::MissingTensor`].
fn get<'a>(st: &SafeTensors<'a>, name: &str) -> Result<TensorView<'a>> {
    st.tensor(name).map_err(|e| match e {
        safetensors::SafeTensorError::TensorNotFound(_) => Error::MissingTensor {
            tensor: name.to_string(),
        },
        other => Error::invalid(format!("tensor `{name}`"), other.to_string()),
    })
}

/// Checks that `view` (named `name`) has dtype `dtype`.
fn expect_dtype(view: &TensorView<'_>, name: &str, dtype: Dtype) -> Result<()> {
    if view.dtype() != dtype {
        return Err(Error::DtypeMismatch {
            tensor: name.to_string(),
            expected: dtype.to_string(),
            found: view.dtype().to_string(),
        });
    }
    Ok(())
}

/// Checks that `view` holds exactly `count` elements (any shape) and that its byte
/// length agrees.
fn expect_count(view: &TensorView<'_>, name: &str, count: usize) -> Result<()> {
    let found = view
        .shape()
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::SizeOverflow {
            tensor: name.to_string(),
            shape: view.shape().iter().map(|&d| d as u64).collect(),
        })?;
    if found != count {
        return Err(Error::length(format!("tensor `{name}`"), count, found));
    }
    let bytes = count.saturating_mul(view.dtype().bitsize() / 8);
    if view.data().len() != bytes {
        return Err(Error::ByteLengthMismatch {
            tensor: name.to_string(),
            expected: bytes as u64,
            found: view.data().len() as u64,
        });
    }
    Ok(())
}

/// Reads an `F32` tensor of exactly `count` elements.
fn read_f32(st: &SafeTensors<'_>, name: &str, count: usize) -> Result<Vec<f32>> {
    let view = get(st, name)?;
    expect_dtype(&view, name, Dtype::F32)?;
    expect_count(&view, name, count)?;
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Reads a `U8` tensor of exactly `count` elements, borrowed.
fn read_u8<'a>(st: &SafeTensors<'a>, name: &str, count: usize) -> Result<&'a [u8]> {
    let view = get(st, name)?;
    expect_dtype(&view, name, Dtype::U8)?;
    expect_count(&view, name, count)?;
    Ok(view.data())
}

/// Parses the `quant_state.bitsandbytes__*` JSON entry of `weight_name`.
fn read_quant_state(st: &SafeTensors<'_>, weight_name: &str) -> Result<(String, QuantStateJson)> {
    let nf4_key = format!("{weight_name}.quant_state.bitsandbytes__nf4");
    let fp4_key = format!("{weight_name}.quant_state.bitsandbytes__fp4");
    let key = match (get(st, &nf4_key), get(st, &fp4_key)) {
        (Ok(_), _) => nf4_key,
        (Err(Error::MissingTensor { .. }), Ok(_)) => {
            return Err(Error::Unsupported {
                what: format!(
                    "`{weight_name}` is bitsandbytes FP4 (`{fp4_key}`); only NF4 can be imported"
                ),
            });
        }
        (Err(e), _) => return Err(e),
    };
    let view = get(st, &key)?;
    expect_dtype(&view, &key, Dtype::U8)?;
    let state: QuantStateJson = serde_json::from_slice(view.data()).map_err(|e| {
        Error::invalid(
            format!("tensor `{key}`"),
            format!("not a bitsandbytes quant state: {e}"),
        )
    })?;
    Ok((key, state))
}

/// Checks that `quant_map` (named `name`) is bitsandbytes' NF4 codebook.
fn check_quant_map(name: &str, quant_map: &[f32]) -> Result<()> {
    let is_nf4 = quant_map
        .iter()
        .zip(NF4_CODEBOOK.iter())
        .all(|(a, b)| (a - b).abs() <= 1e-6);
    if is_nf4 {
        return Ok(());
    }
    let looks_fp4 = quant_map
        .iter()
        .zip(BNB_FP4_FIRST_LEVELS.iter())
        .all(|(a, b)| (a - b).abs() <= 1e-6);
    Err(Error::Unsupported {
        what: if looks_fp4 {
            format!("tensor `{name}` is the FP4 codebook; only NF4 can be imported")
        } else {
            format!("tensor `{name}` is not the NF4 codebook (got {quant_map:?})")
        },
    })
}

/// Decodes the per-block absmax of `weight_name` (plain or double quantised) to f32.
fn read_absmax(
    st: &SafeTensors<'_>,
    weight_name: &str,
    state: &QuantStateJson,
    blocks: usize,
) -> Result<Vec<f32>> {
    let absmax_name = format!("{weight_name}.absmax");
    let nested_absmax_name = format!("{weight_name}.nested_absmax");
    let nested_map_name = format!("{weight_name}.nested_quant_map");
    let json_nested = state.nested_offset.is_some() || state.nested_blocksize.is_some();
    let tensor_nested = st.tensor(&nested_absmax_name).is_ok();
    if json_nested != tensor_nested {
        return Err(if json_nested {
            Error::MissingTensor {
                tensor: nested_absmax_name,
            }
        } else {
            Error::invalid(
                format!("tensor `{nested_absmax_name}`"),
                "present, but the quant state JSON has no nested_offset/nested_blocksize",
            )
        });
    }
    let absmax = if json_nested {
        let field = |what: &str| {
            Error::invalid(
                format!("quant state of `{weight_name}`"),
                format!("double-quantised absmax needs `{what}`"),
            )
        };
        let nested_block = state
            .nested_blocksize
            .ok_or_else(|| field("nested_blocksize"))?;
        let offset = state.nested_offset.ok_or_else(|| field("nested_offset"))?;
        if nested_block == 0 {
            return Err(Error::invalid(
                format!("quant state of `{weight_name}`"),
                "nested_blocksize is 0",
            ));
        }
        if !offset.is_finite() {
            return Err(Error::invalid(
                format!("quant state of `{weight_name}`"),
                format!("nested_offset {offset} is not finite"),
            ));
        }
        // bitsandbytes adds the offset as an f32 tensor.
        let offset = offset as f32;
        let codes = read_u8(st, &absmax_name, blocks)?;
        let nested_absmax = read_f32(st, &nested_absmax_name, blocks.div_ceil(nested_block))?;
        let nested_map = read_f32(st, &nested_map_name, 256)?;
        codes
            .iter()
            .enumerate()
            .map(|(i, &c)| nested_map[c as usize] * nested_absmax[i / nested_block] + offset)
            .collect()
    } else {
        read_f32(st, &absmax_name, blocks)?
    };
    if let Some((i, a)) = absmax.iter().enumerate().find(|(_, a)| !a.is_finite()) {
        return Err(Error::invalid(
            format!("tensor `{absmax_name}`"),
            format!("block {i} has non-finite absmax {a}"),
        ));
    }
    Ok(absmax)
}

/// Imports the bitsandbytes NF4 weight `weight_name` (such as
/// `transformer_blocks.0.attn.to_q.weight`) from a safetensors checkpoint into the
/// canonical NF4 layout. Handles plain (`F32`) and double-quantised (`U8` + nested)
/// absmax.
///
/// Errors: [`Error::MissingTensor`] for an absent entry, [`Error::DtypeMismatch`],
/// [`Error::LengthMismatch`] or [`Error::ByteLengthMismatch`] for a malformed one,
/// [`Error::Unsupported`] for FP4 (or any codebook other than NF4),
/// [`Error::GroupDoesNotDivide`] when a block would cross a row, and
/// [`Error::InvalidArgument`] for an unreadable quant state or an absmax that is not
/// finite in f16.
pub fn import_bnb_nf4(st: &SafeTensors<'_>, weight_name: &str) -> Result<Q4Matrix> {
    let (state_key, state) = read_quant_state(st, weight_name)?;
    if state.quant_type != "nf4" {
        return Err(Error::Unsupported {
            what: format!(
                "`{state_key}` has quant_type `{}`; only nf4 can be imported",
                state.quant_type
            ),
        });
    }
    let (n, k) = match state.shape.as_deref() {
        Some(&[n, k]) if n > 0 && k > 0 => (n, k),
        other => {
            return Err(Error::invalid(
                format!("quant state `{state_key}`"),
                format!("shape {other:?} is not a 2-D [N, K] weight shape"),
            ));
        }
    };
    let block = state.blocksize;
    if !BNB_BLOCK_SIZES.contains(&block) {
        return Err(Error::InvalidGroupSize {
            layer: weight_name.to_string(),
            group: block,
            allowed: BNB_BLOCK_SIZES,
        });
    }
    if !k.is_multiple_of(block) {
        return Err(Error::GroupDoesNotDivide {
            layer: weight_name.to_string(),
            k,
            group: block,
        });
    }
    let total = n
        .checked_mul(k)
        .ok_or_else(|| Error::invalid(format!("quant state `{state_key}`"), "N * K overflows"))?;
    let blocks = total / block;

    let map_name = format!("{weight_name}.quant_map");
    let quant_map = read_f32(st, &map_name, 16)?;
    check_quant_map(&map_name, &quant_map)?;

    // K is a multiple of the block size (>= 32), so N * K is even.
    let codes = read_u8(st, weight_name, total / 2)?;
    let absmax = read_absmax(st, weight_name, &state, blocks)?;

    // Blocks above 128 become several 128-groups sharing the block's absmax.
    let group = block.min(*NF4_BLOCK_SIZES.last().unwrap_or(&128));
    let repeat = block / group;
    let mut scales = Vec::with_capacity(blocks * repeat);
    for (i, &a) in absmax.iter().enumerate() {
        let a16 = f16::from_f32(a);
        if !a16.is_finite() {
            return Err(Error::invalid(
                format!("tensor `{weight_name}.absmax`"),
                format!("block {i} has absmax {a}, which overflows f16"),
            ));
        }
        scales.extend(std::iter::repeat_n(a16, repeat));
    }
    // bitsandbytes keeps the first element of a pair in the high nibble; ours is low.
    let packed = codes.iter().map(|&b| b.rotate_left(4)).collect();
    let m = Q4Matrix {
        kind: Q4Kind::Nf4,
        n,
        k,
        group,
        packed,
        scales,
        offsets: Vec::new(),
    };
    m.view()?;
    Ok(m)
}
