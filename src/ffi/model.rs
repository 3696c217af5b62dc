//! Model exports: load, free, info, block lists.

use std::ffi::{CStr, c_char};
use std::mem::size_of;
use std::path::Path;
use std::sync::Arc;

use super::bindings as b;
use super::error::guard;
use super::handles;
use super::state::ModelState;
use super::status::{self, Failure, FfiResult, Status};
use super::structs::write_out;
use crate::backend::Device;
use crate::model::{AnyModel, Checkpoint, CheckpointKind, CheckpointOptions};

fn to_u32(v: usize, field: &str) -> FfiResult<u32> {
    u32::try_from(v).map_err(|_| {
        Failure::new(
            status::UNSUPPORTED,
            format!("{field} {v} does not fit in 32 bits"),
        )
    })
}

fn load(path: *const c_char, out_model: *mut *mut b::hp_model) -> FfiResult {
    if out_model.is_null() {
        return Err(Failure::invalid("out_model is NULL"));
    }
    if !out_model.is_aligned() {
        return Err(Failure::invalid("out_model pointer is misaligned"));
    }
    // SAFETY: non-NULL and aligned; the caller gives a writable `hp_model *` slot.
    unsafe { out_model.write(std::ptr::null_mut()) };
    if path.is_null() {
        return Err(Failure::invalid("path is NULL"));
    }
    // SAFETY: non-NULL; the header requires a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(path) }
        .to_str()
        .map_err(|_| Failure::invalid("path is not valid UTF-8"))?;
    let path = Path::new(path);
    let checkpoint =
        Checkpoint::open(path, &CheckpointOptions::default()).map_err(Failure::from_load)?;
    let is_package = checkpoint.kind == CheckpointKind::Package;
    let model = AnyModel::from_checkpoint(checkpoint, Device::Cpu).map_err(Failure::from_load)?;
    let bytes = model.weight_bytes().map_err(Failure::from_load)?;
    let file_bytes = model.weights().package().map_or(0, |p| p.file_len());
    log::info!(
        "loaded {} ({} of {} blocks, {} weight bytes)",
        path.display(),
        model
            .prune_spec()
            .kept_blocks(model.config().num_layers)
            .len(),
        model.config().num_layers,
        bytes.total()
    );
    let addr = handles::add_model(ModelState {
        model: Arc::new(model),
        bytes,
        file_bytes,
        is_package,
    });
    // SAFETY: checked non-NULL and aligned above.
    unsafe { out_model.write(addr as *mut b::hp_model) };
    Ok(())
}

/// `hp_model_load` (see the header).
///
/// # Safety
/// As documented in `include/hiprune.h`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hp_model_load(
    path: *const c_char,
    out_model: *mut *mut b::hp_model,
) -> Status {
    guard("hp_model_load", || load(path, out_model))
}

/// `hp_model_free` (see the header).
///
/// # Safety
/// As documented in `include/hiprune.h`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hp_model_free(model: *mut b::hp_model) -> Status {
    guard("hp_model_free", || handles::remove_model(model as usize))
}

fn info(model: *const b::hp_model, out: *mut b::hp_model_info) -> FfiResult {
    let state = handles::model(model as usize)?;
    let cfg = state.model.config();
    let spec = state.model.prune_spec();
    let kept = spec.kept_blocks(cfg.num_layers);
    let component_cuts: usize = kept.iter().map(|&b| spec.mask(b).names().len()).sum();
    let kept = kept.len();
    let bytes = &state.bytes;
    let value = b::hp_model_info {
        struct_size: size_of::<b::hp_model_info>(),
        sample_size: to_u32(cfg.sample_size, "sample_size")?,
        patch_size: to_u32(cfg.patch_size, "patch_size")?,
        in_channels: to_u32(cfg.in_channels, "in_channels")?,
        out_channels: to_u32(cfg.out_channels, "out_channels")?,
        num_layers: to_u32(cfg.num_layers, "num_layers")?,
        attention_head_dim: to_u32(cfg.attention_head_dim, "attention_head_dim")?,
        num_attention_heads: to_u32(cfg.num_attention_heads, "num_attention_heads")?,
        hidden_size: to_u32(cfg.hidden_size(), "hidden_size")?,
        joint_attention_dim: to_u32(cfg.joint_attention_dim, "joint_attention_dim")?,
        caption_projection_dim: to_u32(cfg.caption_projection_dim, "caption_projection_dim")?,
        pooled_projection_dim: to_u32(cfg.pooled_projection_dim, "pooled_projection_dim")?,
        pos_embed_max_size: to_u32(cfg.pos_embed_max_size, "pos_embed_max_size")?,
        num_kept_blocks: to_u32(kept, "kept blocks")?,
        num_dual_attention_layers: to_u32(cfg.dual_attention_layers.len(), "dual layers")?,
        bytes_f32: bytes.f32,
        bytes_f16: bytes.f16,
        bytes_bf16: bytes.bf16,
        bytes_int4: bytes.int4,
        bytes_nf4: bytes.nf4,
        bytes_other: bytes.other,
        bytes_total: bytes.total(),
        file_bytes: state.file_bytes,
        is_package: state.is_package,
        qk_norm: cfg.has_qk_norm(),
        num_component_cuts: to_u32(component_cuts, "component cuts")?,
    };
    write_out(out, value, "out")
}

/// `hp_model_get_info` (see the header).
///
/// # Safety
/// As documented in `include/hiprune.h`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hp_model_get_info(
    model: *const b::hp_model,
    out: *mut b::hp_model_info,
) -> Status {
    guard("hp_model_get_info", || info(model, out))
}

/// The block lists of `hp_model_blocks`, received as integers.
#[derive(Debug, Clone, Copy)]
enum BlockList {
    Kept,
    DualAttention,
    /// Kept blocks without the named sub-component.
    Without(&'static str),
}

impl TryFrom<i32> for BlockList {
    type Error = Failure;

    fn try_from(v: i32) -> FfiResult<Self> {
        match v {
            x if x == b::hp_block_list_HP_BLOCKS_KEPT as i32 => Ok(BlockList::Kept),
            x if x == b::hp_block_list_HP_BLOCKS_DUAL_ATTENTION as i32 => {
                Ok(BlockList::DualAttention)
            }
            x if x == b::hp_block_list_HP_BLOCKS_NO_NORM1 as i32 => Ok(BlockList::Without("norm1")),
            x if x == b::hp_block_list_HP_BLOCKS_NO_NORM1_CONTEXT as i32 => {
                Ok(BlockList::Without("norm1_context"))
            }
            x if x == b::hp_block_list_HP_BLOCKS_NO_ATTN as i32 => Ok(BlockList::Without("attn")),
            x if x == b::hp_block_list_HP_BLOCKS_NO_ATTN2 as i32 => Ok(BlockList::Without("attn2")),
            x if x == b::hp_block_list_HP_BLOCKS_NO_FF as i32 => Ok(BlockList::Without("ff")),
            x if x == b::hp_block_list_HP_BLOCKS_NO_FF_CONTEXT as i32 => {
                Ok(BlockList::Without("ff_context"))
            }
            other => Err(Failure::invalid(format!(
                "which = {other} is not an hp_block_list value"
            ))),
        }
    }
}

fn blocks(
    model: *const b::hp_model,
    which: i32,
    out: *mut u32,
    capacity: usize,
    count: *mut usize,
) -> FfiResult {
    let state = handles::model(model as usize)?;
    let which = BlockList::try_from(which)?;
    if count.is_null() || !count.is_aligned() {
        return Err(Failure::invalid("count is NULL or misaligned"));
    }
    if capacity > 0 && (out.is_null() || !out.is_aligned()) {
        return Err(Failure::invalid(
            "out is NULL or misaligned with capacity > 0",
        ));
    }
    let cfg = state.model.config();
    let list: Vec<usize> = match which {
        BlockList::Kept => state.model.prune_spec().kept_blocks(cfg.num_layers),
        BlockList::DualAttention => cfg.dual_attention_layers.clone(),
        BlockList::Without(component) => {
            let spec = state.model.prune_spec();
            spec.kept_blocks(cfg.num_layers)
                .into_iter()
                .filter(|&b| spec.mask(b).names().contains(&component))
                .collect()
        }
    };
    // SAFETY: checked non-NULL and aligned.
    unsafe { count.write(list.len()) };
    if capacity < list.len() {
        return Err(Failure::size(format!(
            "capacity {capacity} is smaller than the {} blocks of the list",
            list.len()
        )));
    }
    for (i, &v) in list.iter().enumerate() {
        let v = to_u32(v, "block index")?;
        // SAFETY: `out` is non-NULL and aligned (capacity > 0 here unless the list
        // is empty, in which case the loop does not run) and holds `capacity >= len`
        // elements by the header's contract.
        unsafe { out.add(i).write(v) };
    }
    Ok(())
}

/// `hp_model_blocks` (see the header).
///
/// # Safety
/// As documented in `include/hiprune.h`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hp_model_blocks(
    model: *const b::hp_model,
    which: i32,
    out: *mut u32,
    capacity: usize,
    count: *mut usize,
) -> Status {
    guard("hp_model_blocks", || {
        blocks(model, which, out, capacity, count)
    })
}
