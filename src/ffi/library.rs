//! Library-wide exports: versions, status names, the last error, the log callback.

use std::ffi::{c_char, c_void};

use super::bindings as b;
use super::error::{guard, guard_value, last_error_ptr, set_log_sink, static_str};
use super::status::{self, Status};

/// `hp_abi_version` (see the header).
#[unsafe(no_mangle)]
pub extern "C" fn hp_abi_version() -> u32 {
    b::HP_ABI_VERSION
}

/// `hp_version_string` (see the header).
#[unsafe(no_mangle)]
pub extern "C" fn hp_version_string() -> *const c_char {
    static VERSION: &std::ffi::CStr = match std::ffi::CStr::from_bytes_with_nul(
        concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes(),
    ) {
        Ok(s) => s,
        Err(_) => c"unknown",
    };
    static_str(VERSION)
}

/// `hp_status_string` (see the header).
#[unsafe(no_mangle)]
pub extern "C" fn hp_status_string(status: Status) -> *const c_char {
    guard_value(c"HP_ERR_UNKNOWN".as_ptr(), || {
        static_str(status::name(status))
    })
}

/// `hp_last_error_message` (see the header).
#[unsafe(no_mangle)]
pub extern "C" fn hp_last_error_message() -> *const c_char {
    guard_value(c"".as_ptr(), last_error_ptr)
}

/// `hp_log_set` (see the header).
///
/// # Safety
/// As documented in `include/hiprune.h`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hp_log_set(
    callback: b::hp_log_callback,
    user_data: *mut c_void,
) -> Status {
    guard("hp_log_set", || set_log_sink(callback, user_data))
}
