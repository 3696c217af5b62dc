//! The launchers of `cuda/launch.h`, as bindgen declared them, and the mapping of their
//! status to [`Error`].

use crate::error::{Error, Result};

/// The bindgen output for `cuda/launch.h` (`ffi/regen-bindings.sh`; CI regenerates
/// it and fails on a diff).
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    dead_code,
    missing_docs,
    clippy::all
)]
pub(crate) mod sys {
    include!("launch_bindings.rs");
}

/// Largest M the GEMV launchers take; larger M goes to the GEMM launchers.
pub const GEMV_MAX_M: usize = sys::HP_GEMV_MAX_M as usize;

/// Turns a launcher's status into `Ok(())` or [`Error::CudaLaunch`]; `shape` says what
/// was launched, for the message.
pub(crate) fn check_status(
    launcher: &str,
    status: i32,
    shape: impl FnOnce() -> String,
) -> Result<()> {
    let meaning = match status {
        sys::hp_launch_status_HP_LAUNCH_OK => return Ok(()),
        sys::hp_launch_status_HP_LAUNCH_ERR_ARGUMENT => {
            "arguments refused (NULL pointer, size out of range, unsupported group, misaligned buffer or a shape the kernel does not take)"
        }
        sys::hp_launch_status_HP_LAUNCH_ERR_LAUNCH => {
            "the CUDA runtime reported an error at launch"
        }
        _ => "unknown status",
    };
    Err(Error::CudaLaunch {
        launcher: launcher.to_string(),
        status,
        reason: format!("{meaning}; {}", shape()),
    })
}

/// Bytes of the repacked code buffer of an `[n, k]` 4-bit matrix, or an error when the
/// kernels' layout does not take the shape.
pub(crate) fn repacked_bytes(n: usize, k: usize) -> Result<usize> {
    let (Ok(n32), Ok(k32)) = (i32::try_from(n), i32::try_from(k)) else {
        return Err(Error::invalid(
            "4-bit matrix",
            format!("[{n}, {k}] exceeds the CUDA kernels' 32-bit sizes"),
        ));
    };
    // SAFETY: a pure host function of two integers; it touches no memory.
    let bytes = unsafe { sys::hp_q4_repacked_bytes(n32, k32) };
    usize::try_from(bytes)
        .ok()
        .filter(|&b| b > 0 && b >= n * k / 2)
        .ok_or_else(|| {
            Error::invalid(
                "4-bit matrix",
                format!("the CUDA layout does not take [{n}, {k}] (repacked size {bytes})"),
            )
        })
}
