//! The C interface declared in `include/hiprune.h`.
//!
//! Every export runs its body inside [`std::panic::catch_unwind`], checks every
//! pointer, length and enum value it receives, and reports failures as a negative
//! `hp_status` plus a thread-local message. Handles are looked up in a registry of
//! live handles before use (see [`handles`]), so NULL, freed and foreign pointers are
//! rejected without being dereferenced.
//!
//! The struct and function-pointer types come from the bindgen output of the header
//! (`ffi/bindings.rs`), and [`signatures`] ties each export to its declaration there,
//! so the header and the exports cannot drift apart without a compile error.

mod bindings {
    #![allow(
        non_camel_case_types,
        non_upper_case_globals,
        non_snake_case,
        dead_code,
        missing_docs,
        unsafe_op_in_unsafe_fn,
        clippy::all
    )]
    include!("../../ffi/bindings.rs");
}

mod context;
mod error;
mod handles;
mod library;
mod model;
mod signatures;
mod state;
mod status;
mod structs;
