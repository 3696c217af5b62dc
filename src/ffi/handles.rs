//! The registry of live handles.
//!
//! A handle given to C is the address of a small heap token the library allocated;
//! the state behind it lives in this registry, keyed by that address. A call looks
//! the address up (under the registry lock) and clones the state's `Arc`; it never
//! dereferences the caller's pointer. NULL, freed handles, handles of the other kind
//! and foreign pointers are therefore all rejected with `HP_ERR_INVALID_HANDLE`.
//! The one case that cannot be told apart: a freed address that a later handle of the
//! same kind reuses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use super::state::{ContextState, ModelState};
use super::status::{self, Failure, FfiResult};

/// Marks a token allocation (a debugging aid: the registry is what is trusted).
const TOKEN_MAGIC: u64 = 0x6870_7275_6e65_0001;

enum Live {
    Model(Arc<ModelState>),
    Context(Arc<ContextState>),
}

static REGISTRY: LazyLock<Mutex<HashMap<usize, Live>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn registry() -> MutexGuard<'static, HashMap<usize, Live>> {
    // The lock is only held for map operations that cannot leave it inconsistent.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_token() -> usize {
    Box::into_raw(Box::new(TOKEN_MAGIC)) as usize
}

/// Frees a token that was just removed from the registry.
fn free_token(addr: usize) {
    // SAFETY: `addr` was in the registry, and only `new_token` inserts addresses, so it
    // came from `Box::into_raw(Box<u64>)`. The caller removed it from the registry
    // under the lock, so no other call can free it again or look it up.
    drop(unsafe { Box::from_raw(addr as *mut u64) });
}

/// Registers a model; returns its handle address.
pub(crate) fn add_model(state: ModelState) -> usize {
    let addr = new_token();
    registry().insert(addr, Live::Model(Arc::new(state)));
    addr
}

/// Registers a context; returns its handle address.
pub(crate) fn add_context(state: ContextState) -> usize {
    let addr = new_token();
    registry().insert(addr, Live::Context(Arc::new(state)));
    addr
}

fn not_live(kind: &str, addr: usize) -> Failure {
    if addr == 0 {
        Failure::new(status::INVALID_HANDLE, format!("{kind} handle is NULL"))
    } else {
        Failure::new(
            status::INVALID_HANDLE,
            format!(
                "{addr:#x} is not a live {kind} handle (freed already, or not made by this library)"
            ),
        )
    }
}

/// The model behind `addr`.
pub(crate) fn model(addr: usize) -> FfiResult<Arc<ModelState>> {
    match registry().get(&addr) {
        Some(Live::Model(m)) => Ok(Arc::clone(m)),
        Some(Live::Context(_)) => Err(Failure::new(
            status::INVALID_HANDLE,
            "handle is a context, not a model",
        )),
        None => Err(not_live("model", addr)),
    }
}

/// The context behind `addr`.
pub(crate) fn context(addr: usize) -> FfiResult<Arc<ContextState>> {
    match registry().get(&addr) {
        Some(Live::Context(c)) => Ok(Arc::clone(c)),
        Some(Live::Model(_)) => Err(Failure::new(
            status::INVALID_HANDLE,
            "handle is a model, not a context",
        )),
        None => Err(not_live("context", addr)),
    }
}

/// Unregisters the model `addr` (NULL is a no-op).
pub(crate) fn remove_model(addr: usize) -> FfiResult {
    if addr == 0 {
        return Ok(());
    }
    let removed = {
        let mut reg = registry();
        match reg.get(&addr) {
            Some(Live::Model(_)) => reg.remove(&addr),
            Some(Live::Context(_)) => {
                return Err(Failure::new(
                    status::INVALID_HANDLE,
                    "handle is a context, not a model (use hp_context_free)",
                ));
            }
            None => return Err(not_live("model", addr)),
        }
    };
    free_token(addr);
    // The state drops here, outside the lock (contexts may still hold it).
    drop(removed);
    Ok(())
}

/// Unregisters the context `addr` unless it is running (NULL is a no-op).
pub(crate) fn remove_context(addr: usize) -> FfiResult {
    if addr == 0 {
        return Ok(());
    }
    let removed = {
        let mut reg = registry();
        match reg.get(&addr) {
            Some(Live::Context(c)) => {
                if c.busy.load(Ordering::Acquire) {
                    return Err(Failure::new(
                        status::BUSY,
                        "context is running in another thread; nothing was freed",
                    ));
                }
                reg.remove(&addr)
            }
            Some(Live::Model(_)) => {
                return Err(Failure::new(
                    status::INVALID_HANDLE,
                    "handle is a model, not a context (use hp_model_free)",
                ));
            }
            None => return Err(not_live("context", addr)),
        }
    };
    free_token(addr);
    drop(removed);
    Ok(())
}

/// Holds a context's busy flag for the length of one call.
pub(crate) struct BusyGuard<'a>(&'a AtomicBool);

impl<'a> BusyGuard<'a> {
    /// Takes the flag, or `HP_ERR_BUSY` when another thread holds it.
    pub fn acquire(flag: &'a AtomicBool) -> FfiResult<Self> {
        flag.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| {
                Failure::new(
                    status::BUSY,
                    "context is in use by another thread (one call at a time)",
                )
            })?;
        Ok(BusyGuard(flag))
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
