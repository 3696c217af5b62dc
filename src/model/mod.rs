//! The MMDiT model description (diffusers' `SD3Transformer2DModel`).

pub mod config;

pub use config::MmditConfig;
