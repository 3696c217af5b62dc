//! Context exports: create/free/info, the forward pass, the sampler, memory.

use std::mem::size_of;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::bindings as b;
use super::error::{guard, guard_value};
use super::handles::{self, BusyGuard};
use super::state::{ContextState, ModelState};
use super::status::{self, Failure, FfiResult, Status};
use super::structs::{read_params, write_out};
use crate::backend::Device;
use crate::model::sampler::{Conditioning, SampleOptions, initial_latent};
use crate::model::{AnyModel, MmditInputs, Tensor};

/// The backends of `hp_context_params.backend`, received as an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Auto,
    Cpu,
    Cuda,
}

impl TryFrom<i32> for Backend {
    type Error = Failure;

    fn try_from(v: i32) -> FfiResult<Self> {
        match v {
            x if x == b::hp_backend_HP_BACKEND_AUTO as i32 => Ok(Backend::Auto),
            x if x == b::hp_backend_HP_BACKEND_CPU as i32 => Ok(Backend::Cpu),
            x if x == b::hp_backend_HP_BACKEND_CUDA as i32 => Ok(Backend::Cuda),
            other => Err(Failure::invalid(format!(
                "params->backend = {other} is not an hp_backend value"
            ))),
        }
    }
}

fn default_context_params() -> b::hp_context_params {
    b::hp_context_params {
        struct_size: size_of::<b::hp_context_params>(),
        backend: b::hp_backend_HP_BACKEND_AUTO as i32,
        device: 0,
        n_threads: 0,
    }
}

/// `hp_context_default_params` (see the header).
#[unsafe(no_mangle)]
pub extern "C" fn hp_context_default_params() -> b::hp_context_params {
    guard_value(default_context_params(), default_context_params)
}

fn create(
    model: *const b::hp_model,
    params: *const b::hp_context_params,
    out_ctx: *mut *mut b::hp_context,
) -> FfiResult {
    if out_ctx.is_null() || !out_ctx.is_aligned() {
        return Err(Failure::invalid("out_ctx is NULL or misaligned"));
    }
    // SAFETY: non-NULL and aligned; the caller gives a writable `hp_context *` slot.
    unsafe { out_ctx.write(std::ptr::null_mut()) };
    let model = handles::model(model as usize)?;
    let params = read_params(params, default_context_params(), "params")?;
    let backend = Backend::try_from(params.backend)?;
    if params.device < 0 {
        return Err(Failure::invalid(format!(
            "params->device = {} is negative",
            params.device
        )));
    }
    let cuda = Device::Cuda(params.device as usize);
    let (engine, fallback) = match backend {
        Backend::Cpu => {
            if params.device != 0 {
                return Err(Failure::invalid(format!(
                    "params->device = {} but the CPU backend has only device 0",
                    params.device
                )));
            }
            (Arc::clone(&model.model), None)
        }
        Backend::Cuda => (
            Arc::new(on_device(&model, cuda).map_err(Failure::from_load)?),
            None,
        ),
        Backend::Auto => match on_device(&model, cuda) {
            Ok(engine) => (Arc::new(engine), None),
            Err(e) if e.is_device_unavailable() => {
                let reason = e.to_string();
                log::info!("context: HP_BACKEND_AUTO runs on the CPU: {reason}");
                (Arc::clone(&model.model), Some(reason))
            }
            Err(e) => return Err(Failure::from_load(e)),
        },
    };
    let threads = params.n_threads as usize;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("hiprune-{i}"))
        .build()
        .map_err(|e| Failure::new(status::INTERNAL, format!("thread pool: {e}")))?;
    log::info!(
        "context: {} backend, {} worker threads",
        engine.device(),
        pool.current_num_threads()
    );
    let addr = handles::add_context(ContextState {
        model,
        engine,
        fallback,
        pool,
        busy: AtomicBool::new(false),
        scratch: AtomicU64::new(0),
    });
    // SAFETY: checked non-NULL and aligned above.
    unsafe { out_ctx.write(addr as *mut b::hp_context) };
    Ok(())
}

/// The model of `state` uploaded to `device`, from the weights the CPU model holds.
fn on_device(state: &ModelState, device: Device) -> crate::Result<AnyModel> {
    let cpu = &state.model;
    AnyModel::build(
        cpu.config().clone(),
        Arc::clone(cpu.weights()),
        cpu.prune_spec().clone(),
        device,
    )
}

/// `hp_context_create` (see the header).
///
/// # Safety
/// As documented in `include/hiprune.h`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hp_context_create(
    model: *const b::hp_model,
    params: *const b::hp_context_params,
    out_ctx: *mut *mut b::hp_context,
) -> Status {
    guard("hp_context_create", || create(model, params, out_ctx))
}

/// `hp_context_free` (see the header).
///
/// # Safety
/// As documented in `include/hiprune.h`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hp_context_free(ctx: *mut b::hp_context) -> Status {
    guard("hp_context_free", || handles::remove_context(ctx as usize))
}

fn info(ctx: *const b::hp_context, out: *mut b::hp_context_info) -> FfiResult {
    let ctx = handles::context(ctx as usize)?;
    let (backend, device) = match ctx.engine.device() {
        Device::Cpu => (b::hp_backend_HP_BACKEND_CPU, 0),
        Device::Cuda(n) => (b::hp_backend_HP_BACKEND_CUDA, n),
    };
    let mut value = b::hp_context_info {
        struct_size: size_of::<b::hp_context_info>(),
        backend: backend as i32,
        device: i32::try_from(device)
            .map_err(|_| Failure::new(status::INTERNAL, "device index beyond int32_t"))?,
        n_threads: u32::try_from(ctx.pool.current_num_threads()).unwrap_or(u32::MAX),
        fell_back: ctx.fallback.is_some(),
        fallback_reason: [0; 256],
    };
    if let Some(reason) = &ctx.fallback {
        copy_c_string(reason, &mut value.fallback_reason);
    }
    write_out(out, value, "out")
}

/// Copies `text` into `buf` as a NUL-terminated C string, cut at a UTF-8 character
/// boundary to fit.
fn copy_c_string(text: &str, buf: &mut [std::ffi::c_char]) {
    let room = buf.len().saturating_sub(1);
    let mut end = text.len().min(room);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    for (dst, &src) in buf.iter_mut().zip(&text.as_bytes()[..end]) {
        *dst = src as std::ffi::c_char;
    }
    if let Some(nul) = buf.get_mut(end) {
        *nul = 0;
    }
}

/// `hp_context_get_info` (see the header).
///
/// # Safety
/// As documented in `include/hiprune.h`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hp_context_get_info(
    ctx: *const b::hp_context,
    out: *mut b::hp_context_info,
) -> Status {
    guard("hp_context_get_info", || info(ctx, out))
}

/// Checked sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    batch: usize,
    h: usize,
    w: usize,
    tokens: usize,
    latent_in: usize,
    latent_out: usize,
    context: usize,
    pooled: usize,
}

fn mul(parts: &[usize], what: &str) -> FfiResult<usize> {
    parts
        .iter()
        .try_fold(1usize, |acc, &v| acc.checked_mul(v))
        .ok_or_else(|| Failure::size(format!("{what}: shape {parts:?} overflows")))
}

fn sizes(state: &ModelState, dims: *const b::hp_dims) -> FfiResult<Sizes> {
    if dims.is_null() || !dims.is_aligned() {
        return Err(Failure::invalid("dims is NULL or misaligned"));
    }
    // SAFETY: non-NULL and aligned; the caller passes an `hp_dims`.
    let d = unsafe { dims.read() };
    for (name, v) in [
        ("batch", d.batch),
        ("height", d.height),
        ("width", d.width),
        ("context_tokens", d.context_tokens),
    ] {
        if v == 0 {
            return Err(Failure::invalid(format!("dims->{name} is 0")));
        }
    }
    let cfg = state.model.config();
    Ok(Sizes {
        batch: d.batch,
        h: d.height,
        w: d.width,
        tokens: d.context_tokens,
        latent_in: mul(&[d.batch, cfg.in_channels, d.height, d.width], "latent")?,
        latent_out: mul(&[d.batch, cfg.out_channels, d.height, d.width], "output")?,
        context: mul(
            &[d.batch, d.context_tokens, cfg.joint_attention_dim],
            "context",
        )?,
        pooled: mul(&[d.batch, cfg.pooled_projection_dim], "pooled")?,
    })
}

/// Copies the caller's buffer `ptr[..len]` after checking it against `expected`.
fn input(ptr: *const f32, len: usize, expected: usize, what: &str) -> FfiResult<Vec<f32>> {
    if ptr.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    if !ptr.is_aligned() {
        return Err(Failure::invalid(format!("{what} is not 4-byte aligned")));
    }
    if len != expected {
        return Err(Failure::size(format!(
            "{what}_len is {len} but the shape needs {expected} elements"
        )));
    }
    // SAFETY: non-NULL and aligned; the header requires `len` readable floats at
    // `ptr` that nothing writes during the call.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec())
}

/// Checks the caller's output buffer.
fn output(ptr: *mut f32, len: usize, expected: usize, what: &str) -> FfiResult<*mut f32> {
    if ptr.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    if !ptr.is_aligned() {
        return Err(Failure::invalid(format!("{what} is not 4-byte aligned")));
    }
    if len != expected {
        return Err(Failure::size(format!(
            "{what}_len is {len} but the shape needs {expected} elements"
        )));
    }
    Ok(ptr)
}

/// Copies a result of `expected` elements (the caller's checked output length) to the
/// caller's buffer; a result of any other length is an internal error, never written.
fn write_output(ptr: *mut f32, data: &[f32], expected: usize, what: &str) -> FfiResult {
    if data.len() != expected {
        return Err(Failure::new(
            status::INTERNAL,
            format!(
                "{what} returned {} elements, expected {expected}",
                data.len()
            ),
        ));
    }
    // SAFETY: `ptr` passed `output` with `len == expected == data.len()`, and the header
    // requires that many writable floats that do not overlap the inputs (which were
    // copied).
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
    Ok(())
}

fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FfiResult<Tensor> {
    Tensor::new(data, shape).map_err(Failure::from_run)
}

/// f32 activations alive together inside one block of a forward with these sizes
/// (see `hp_memory_info.scratch_bytes` in the header).
fn forward_scratch(state: &ModelState, batch: usize, s: &Sizes) -> u64 {
    let cfg = state.model.config();
    let d = cfg.hidden_size() as u64;
    let n_img = ((s.h / cfg.patch_size) * (s.w / cfg.patch_size)) as u64;
    let n_ctx = s.tokens as u64;
    let l = n_img + n_ctx;
    let per_item = d * (2 * n_img + 2 * n_ctx + 3 * l + l + 4 * n_img.max(n_ctx));
    4 * (batch as u64 * per_item)
}

fn record_scratch(ctx: &ContextState, bytes: u64) {
    ctx.scratch.fetch_max(bytes, Ordering::Relaxed);
}

#[allow(clippy::too_many_arguments)]
fn forward(
    ctx: *mut b::hp_context,
    dims: *const b::hp_dims,
    latent: (*const f32, usize),
    context: (*const f32, usize),
    pooled: (*const f32, usize),
    timestep: (*const f32, usize),
    out: (*mut f32, usize),
) -> FfiResult {
    let ctx = handles::context(ctx as usize)?;
    let _busy = BusyGuard::acquire(&ctx.busy)?;
    let state = &ctx.model;
    let s = sizes(state, dims)?;
    let cfg = state.model.config();
    let hs = input(latent.0, latent.1, s.latent_in, "latent")?;
    let ehs = input(context.0, context.1, s.context, "context")?;
    let pp = input(pooled.0, pooled.1, s.pooled, "pooled")?;
    let ts = input(timestep.0, timestep.1, s.batch, "timestep")?;
    let out_ptr = output(out.0, out.1, s.latent_out, "out")?;
    let hs = tensor(hs, vec![s.batch, cfg.in_channels, s.h, s.w])?;
    let ehs = tensor(ehs, vec![s.batch, s.tokens, cfg.joint_attention_dim])?;
    let pp = tensor(pp, vec![s.batch, cfg.pooled_projection_dim])?;
    let ts = tensor(ts, vec![s.batch])?;
    let inputs = MmditInputs {
        hidden_states: &hs,
        encoder_hidden_states: &ehs,
        pooled_projections: &pp,
        timestep: &ts,
    };
    let io = 4 * (s.latent_in + s.context + s.pooled + s.batch + s.latent_out) as u64;
    record_scratch(&ctx, forward_scratch(state, s.batch, &s) + io);
    let y = ctx
        .pool
        .install(|| ctx.engine.forward(&inputs))
        .map_err(Failure::from_run)?;
    write_output(out_ptr, &y.data, s.latent_out, "model")
}

/// `hp_forward` (see the header).
///
/// # Safety
/// As documented in `include/hiprune.h`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hp_forward(
    ctx: *mut b::hp_context,
    dims: *const b::hp_dims,
    latent: *const f32,
    latent_len: usize,
    context: *const f32,
    context_len: usize,
    pooled: *const f32,
    pooled_len: usize,
    timestep: *const f32,
    timestep_len: usize,
    out: *mut f32,
    out_len: usize,
) -> Status {
    guard("hp_forward", || {
        forward(
            ctx,
            dims,
            (latent, latent_len),
            (context, context_len),
            (pooled, pooled_len),
            (timestep, timestep_len),
            (out, out_len),
        )
    })
}

fn default_sample_params() -> b::hp_sample_params {
    b::hp_sample_params {
        struct_size: size_of::<b::hp_sample_params>(),
        steps: 28,
        guidance: 1.0,
        shift: crate::model::sampler::DEFAULT_SHIFT,
        seed: 0,
        progress: None,
        progress_user_data: std::ptr::null_mut(),
    }
}

/// `hp_sample_default_params` (see the header).
#[unsafe(no_mangle)]
pub extern "C" fn hp_sample_default_params() -> b::hp_sample_params {
    guard_value(default_sample_params(), default_sample_params)
}

/// The progress callback and its user data, carried to the worker thread.
#[derive(Clone, Copy)]
struct Progress {
    callback: b::hp_progress_callback,
    user_data: *mut std::ffi::c_void,
}

// SAFETY: the header documents that the progress callback runs on one of the
// context's worker threads with the given user data; the caller accepts that. The
// library only copies the pointer and calls the callback one call at a time.
unsafe impl Send for Progress {}
// SAFETY: as for `Send`; shared references only read the two fields.
unsafe impl Sync for Progress {}

impl Progress {
    fn call(&self, step: usize, steps: usize, sigma: f32) -> bool {
        match self.callback {
            None => true,
            // SAFETY: the caller gave a valid function of this signature (header
            // contract); the step counts fit in u32 as `steps` came from a u32.
            Some(f) => unsafe { f(step as u32, steps as u32, sigma, self.user_data) },
        }
    }
}

/// Optional caller buffer: NULL with length 0 is "absent".
fn optional_input(
    ptr: *const f32,
    len: usize,
    expected: usize,
    what: &str,
) -> FfiResult<Option<Vec<f32>>> {
    if ptr.is_null() && len == 0 {
        return Ok(None);
    }
    input(ptr, len, expected, what).map(Some)
}

#[allow(clippy::too_many_arguments)]
fn run_sample(
    ctx: *mut b::hp_context,
    params: *const b::hp_sample_params,
    dims: *const b::hp_dims,
    context: (*const f32, usize),
    pooled: (*const f32, usize),
    neg_context: (*const f32, usize),
    neg_pooled: (*const f32, usize),
    latent_init: (*const f32, usize),
    latent_out: (*mut f32, usize),
) -> FfiResult {
    let ctx = handles::context(ctx as usize)?;
    let _busy = BusyGuard::acquire(&ctx.busy)?;
    let state = &ctx.model;
    let p = read_params(params, default_sample_params(), "params")?;
    if p.steps == 0 {
        return Err(Failure::invalid("params->steps is 0"));
    }
    if !(p.shift.is_finite() && p.shift > 0.0) {
        return Err(Failure::invalid(format!(
            "params->shift = {} must be finite and > 0",
            p.shift
        )));
    }
    if !p.guidance.is_finite() {
        return Err(Failure::invalid(format!(
            "params->guidance = {} is not finite",
            p.guidance
        )));
    }
    let cfg = state.model.config();
    if cfg.in_channels != cfg.out_channels {
        return Err(Failure::new(
            status::UNSUPPORTED,
            format!(
                "sampling needs in_channels == out_channels (model has {} and {})",
                cfg.in_channels, cfg.out_channels
            ),
        ));
    }
    let s = sizes(state, dims)?;
    let guided = p.guidance > 1.0;
    let ehs = input(context.0, context.1, s.context, "context")?;
    let pp = input(pooled.0, pooled.1, s.pooled, "pooled")?;
    let nehs = optional_input(neg_context.0, neg_context.1, s.context, "negative_context")?;
    let npp = optional_input(neg_pooled.0, neg_pooled.1, s.pooled, "negative_pooled")?;
    if guided && (nehs.is_none() || npp.is_none()) {
        return Err(Failure::invalid(format!(
            "guidance {} > 1 needs negative_context and negative_pooled",
            p.guidance
        )));
    }
    let latent_shape = vec![s.batch, cfg.in_channels, s.h, s.w];
    let latent = match optional_input(latent_init.0, latent_init.1, s.latent_in, "latent_init")? {
        Some(v) => tensor(v, latent_shape)?,
        None => initial_latent(latent_shape, p.seed).map_err(Failure::from_run)?,
    };
    let out_ptr = output(latent_out.0, latent_out.1, s.latent_out, "latent_out")?;
    let ehs = tensor(ehs, vec![s.batch, s.tokens, cfg.joint_attention_dim])?;
    let pp = tensor(pp, vec![s.batch, cfg.pooled_projection_dim])?;
    let nehs = nehs
        .map(|v| tensor(v, vec![s.batch, s.tokens, cfg.joint_attention_dim]))
        .transpose()?;
    let npp = npp
        .map(|v| tensor(v, vec![s.batch, cfg.pooled_projection_dim]))
        .transpose()?;
    let cond = Conditioning {
        encoder_hidden_states: &ehs,
        pooled_projections: &pp,
        negative_encoder_hidden_states: nehs.as_ref(),
        negative_pooled_projections: npp.as_ref(),
    };
    let opts = SampleOptions {
        steps: p.steps as usize,
        shift: p.shift,
        guidance: Some(p.guidance),
    };
    let model_batch = if guided { 2 * s.batch } else { s.batch };
    let copies = if guided { 4 } else { 2 };
    let kept = 4 * (copies * (s.latent_in + s.context + s.pooled) + model_batch) as u64;
    record_scratch(&ctx, forward_scratch(state, model_batch, &s) + kept);
    let progress = Progress {
        callback: p.progress,
        user_data: p.progress_user_data,
    };
    let result = ctx
        .pool
        .install(|| {
            ctx.engine
                .sample_cancellable(latent, &cond, &opts, |i, n, sigma| {
                    log::debug!("sample step {}/{n}, sigma {sigma}", i + 1);
                    progress.call(i, n, sigma)
                })
        })
        .map_err(Failure::from_run)?;
    let Some(x) = result else {
        return Err(Failure::new(
            status::ABORTED,
            "the progress callback asked to stop",
        ));
    };
    write_output(out_ptr, &x.data, s.latent_out, "sampler")
}

/// `hp_sample` (see the header).
///
/// # Safety
/// As documented in `include/hiprune.h`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hp_sample(
    ctx: *mut b::hp_context,
    params: *const b::hp_sample_params,
    dims: *const b::hp_dims,
    context: *const f32,
    context_len: usize,
    pooled: *const f32,
    pooled_len: usize,
    negative_context: *const f32,
    negative_context_len: usize,
    negative_pooled: *const f32,
    negative_pooled_len: usize,
    latent_init: *const f32,
    latent_init_len: usize,
    latent_out: *mut f32,
    latent_out_len: usize,
) -> Status {
    guard("hp_sample", || {
        run_sample(
            ctx,
            params,
            dims,
            (context, context_len),
            (pooled, pooled_len),
            (negative_context, negative_context_len),
            (negative_pooled, negative_pooled_len),
            (latent_init, latent_init_len),
            (latent_out, latent_out_len),
        )
    })
}

fn memory(ctx: *const b::hp_context, out: *mut b::hp_memory_info) -> FfiResult {
    let ctx = handles::context(ctx as usize)?;
    let _busy = BusyGuard::acquire(&ctx.busy)?;
    let weights = ctx.model.bytes.total();
    let scratch = ctx.scratch.load(Ordering::Relaxed);
    let value = b::hp_memory_info {
        struct_size: size_of::<b::hp_memory_info>(),
        weight_bytes: weights,
        scratch_bytes: scratch,
        peak_bytes: weights.saturating_add(scratch),
    };
    write_out(out, value, "out")
}

/// `hp_context_memory` (see the header).
///
/// # Safety
/// As documented in `include/hiprune.h`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hp_context_memory(
    ctx: *const b::hp_context,
    out: *mut b::hp_memory_info,
) -> Status {
    guard("hp_context_memory", || memory(ctx, out))
}
