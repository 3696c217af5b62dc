//! The image-generation pipeline around the transformer: the VAE decoder that turns
//! sampled latents into images, and PNG output.

pub mod png;
pub mod vae;

pub use png::{ImageMetadata, RgbImage};
pub use vae::{AnyVaeDecoder, Tiling, VaeConfig, VaeDecoder};
