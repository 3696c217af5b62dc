//! `hp_status` codes and the mapping from [`Error`] to them.

use super::bindings as b;
use crate::error::Error;

/// A status code of the header.
pub(crate) type Status = b::hp_status;

pub(crate) const OK: Status = b::hp_status_code_HP_OK;
pub(crate) const INVALID_ARGUMENT: Status = b::hp_status_code_HP_ERR_INVALID_ARGUMENT;
pub(crate) const INVALID_HANDLE: Status = b::hp_status_code_HP_ERR_INVALID_HANDLE;
pub(crate) const SIZE_MISMATCH: Status = b::hp_status_code_HP_ERR_SIZE_MISMATCH;
pub(crate) const IO: Status = b::hp_status_code_HP_ERR_IO;
pub(crate) const INVALID_MODEL: Status = b::hp_status_code_HP_ERR_INVALID_MODEL;
pub(crate) const BACKEND_UNAVAILABLE: Status = b::hp_status_code_HP_ERR_BACKEND_UNAVAILABLE;
pub(crate) const BUSY: Status = b::hp_status_code_HP_ERR_BUSY;
pub(crate) const ABORTED: Status = b::hp_status_code_HP_ERR_ABORTED;
pub(crate) const UNSUPPORTED: Status = b::hp_status_code_HP_ERR_UNSUPPORTED;
pub(crate) const INTERNAL: Status = b::hp_status_code_HP_ERR_INTERNAL;

/// The name of `status`, NUL-terminated.
pub(crate) fn name(status: Status) -> &'static std::ffi::CStr {
    match status {
        OK => c"HP_OK",
        INVALID_ARGUMENT => c"HP_ERR_INVALID_ARGUMENT",
        INVALID_HANDLE => c"HP_ERR_INVALID_HANDLE",
        SIZE_MISMATCH => c"HP_ERR_SIZE_MISMATCH",
        IO => c"HP_ERR_IO",
        INVALID_MODEL => c"HP_ERR_INVALID_MODEL",
        BACKEND_UNAVAILABLE => c"HP_ERR_BACKEND_UNAVAILABLE",
        BUSY => c"HP_ERR_BUSY",
        ABORTED => c"HP_ERR_ABORTED",
        UNSUPPORTED => c"HP_ERR_UNSUPPORTED",
        INTERNAL => c"HP_ERR_INTERNAL",
        _ => c"HP_ERR_UNKNOWN",
    }
}

/// A failed call: the status to return and the message for `hp_last_error_message`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: Status,
    pub message: String,
}

impl Failure {
    /// A failure with `status`.
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }

    /// `HP_ERR_INVALID_ARGUMENT`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Failure::new(INVALID_ARGUMENT, message)
    }

    /// `HP_ERR_SIZE_MISMATCH`.
    pub fn size(message: impl Into<String>) -> Self {
        Failure::new(SIZE_MISMATCH, message)
    }

    /// A crate error raised while loading a model: I/O errors stay I/O errors,
    /// unsupported requests and unavailable backends keep their codes, everything else
    /// is a broken file.
    pub fn from_load(e: Error) -> Self {
        let status = match &e {
            Error::Io { .. } => IO,
            Error::Unsupported { .. } => UNSUPPORTED,
            Error::NoCudaDevice { .. } | Error::BackendNotCompiled { .. } => BACKEND_UNAVAILABLE,
            _ => INVALID_MODEL,
        };
        Failure::new(status, e.to_string())
    }

    /// A crate error raised while running a loaded model.
    pub fn from_run(e: Error) -> Self {
        let status = match &e {
            Error::InvalidArgument { .. } => INVALID_ARGUMENT,
            Error::ShapeMismatch { .. } | Error::LengthMismatch { .. } => SIZE_MISMATCH,
            Error::Unsupported { .. } => UNSUPPORTED,
            Error::NoCudaDevice { .. } | Error::BackendNotCompiled { .. } => BACKEND_UNAVAILABLE,
            Error::Io { .. } => IO,
            Error::MissingTensor { .. } if is_input_tensor(&e) => INVALID_ARGUMENT,
            _ => INVALID_MODEL,
        };
        Failure::new(status, e.to_string())
    }
}

/// Whether a missing-tensor error is about a caller input (the negative embeddings of
/// guided sampling) rather than a weight.
fn is_input_tensor(e: &Error) -> bool {
    matches!(e, Error::MissingTensor { tensor } if tensor.starts_with("negative_"))
}

/// Result of an export's body.
pub(crate) type FfiResult<T = ()> = Result<T, Failure>;
