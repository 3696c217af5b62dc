//! Copying the C interface's versioned structs (those that start with `struct_size`)
//! in and out.

use std::mem::size_of;

use super::status::{Failure, FfiResult};

/// Reads a caller's parameter struct of type `T` whose first field is `struct_size`:
/// NULL gives `default`; otherwise at most `size_of::<T>()` bytes are read and the rest
/// keep their defaults.
pub(crate) fn read_params<T: Copy>(ptr: *const T, default: T, what: &str) -> FfiResult<T> {
    if ptr.is_null() {
        return Ok(default);
    }
    if !ptr.is_aligned() {
        return Err(Failure::invalid(format!("{what} pointer is misaligned")));
    }
    // SAFETY: `ptr` is non-NULL and aligned, and the header requires it to point to a
    // struct starting with its `size_t struct_size` field.
    let size = unsafe { ptr.cast::<usize>().read() };
    let n = checked_struct_size(size, size_of::<T>(), what)?;
    let mut value = default;
    // SAFETY: the caller's struct holds `size >= n` readable bytes (header contract);
    // `value` is a distinct local `T` of `size_of::<T>() >= n` bytes; `T` is a
    // plain-data bindgen struct, so any prefix of a valid value copied over a valid
    // value is valid for the integer and float fields. Function-pointer fields are
    // `Option`s, for which NULL is valid, and the caller vouches for non-NULL ones.
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), (&raw mut value).cast::<u8>(), n) };
    // Report our own size from here on.
    // SAFETY: `value` is a `T` whose first field is a `usize` (`struct_size`).
    unsafe { (&raw mut value).cast::<usize>().write(size_of::<T>()) };
    Ok(value)
}

/// Writes `value` to a caller's output struct whose `struct_size` says how many bytes
/// it holds; afterwards `struct_size` is the number of bytes written.
pub(crate) fn write_out<T: Copy>(ptr: *mut T, value: T, what: &str) -> FfiResult {
    if ptr.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    if !ptr.is_aligned() {
        return Err(Failure::invalid(format!("{what} pointer is misaligned")));
    }
    // SAFETY: non-NULL, aligned, and the header requires the struct to start with its
    // `size_t struct_size` field, set by the caller.
    let size = unsafe { ptr.cast::<usize>().read() };
    let n = checked_struct_size(size, size_of::<T>(), what)?;
    // SAFETY: the caller's struct has room for `size >= n` bytes (header contract) and
    // does not overlap the local `value`.
    unsafe {
        std::ptr::copy_nonoverlapping((&raw const value).cast::<u8>(), ptr.cast::<u8>(), n);
        ptr.cast::<usize>().write(n);
    }
    Ok(())
}

/// The byte count to copy for a struct whose caller says it has `size` bytes.
fn checked_struct_size(size: usize, ours: usize, what: &str) -> FfiResult<usize> {
    // Every struct of this ABI version is its first released version, so the minimum
    // is the full size. Later versions will keep this minimum and accept a prefix.
    if size < ours {
        return Err(Failure::invalid(format!(
            "{what}->struct_size is {size}, smaller than the {ours} bytes of its first version (set it to sizeof)"
        )));
    }
    Ok(size.min(ours))
}
