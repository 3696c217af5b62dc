//! What a handle stands for: the state behind an `hp_model` and an `hp_context`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use crate::model::{AnyModel, WeightBytes};

/// A loaded model and its storage statistics.
pub(crate) struct ModelState {
    /// The model on the CPU, every tensor checked at load; CPU contexts run it, and
    /// device contexts upload from its weights.
    pub model: Arc<AnyModel>,
    pub bytes: WeightBytes,
    pub file_bytes: u64,
    pub is_package: bool,
}

/// A backend with a model and its own worker pool.
pub(crate) struct ContextState {
    /// The model handle's state (sizes, weight statistics).
    pub model: Arc<ModelState>,
    /// What this context runs: the handle's CPU model, or its own device upload.
    pub engine: Arc<AnyModel>,
    /// Why `HP_BACKEND_AUTO` fell back to the CPU, if it did.
    pub fallback: Option<String>,
    pub pool: rayon::ThreadPool,
    /// Set while a call runs (one call at a time).
    pub busy: AtomicBool,
    /// Scratch estimate of the largest call so far, bytes.
    pub scratch: AtomicU64,
}
