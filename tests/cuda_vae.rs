//! The VAE decoder on the CUDA backend against diffusers' `AutoencoderKL` (the
//! fixtures of `tests/vae_decode.rs`). Skips with a printed reason without a device.
#![cfg(feature = "cuda")]

mod common;

use hiprune::backend::Device;
use hiprune::backend::cuda::CudaBackend;
use hiprune::pipeline::VaeDecoder;

use common::{
    VAE_FIXTURE_TILES as FIXTURE_TILES, rel_err, vae_fixture, vae_reference as reference,
};

/// The CUDA decoder against diffusers: f16 activations with f32 accumulation, so the
/// tolerance is that of an f16 emulation of the network's depth (a few 1e-3 of the
/// output range); skipped with a printed reason without a device.
#[test]
fn cuda_decode_matches_diffusers() {
    if common::gpu().is_none() {
        return;
    }
    for name in ["sd3", "sd"] {
        let vae = VaeDecoder::<CudaBackend>::load(vae_fixture(name).join("vae"), Device::Cuda(0))
            .unwrap();
        let reference = reference(name);
        let latents = reference.get("latents").unwrap();
        let image = vae.decode(latents, None).unwrap();
        let err = rel_err(&image, reference.get("image").unwrap());
        println!("{name}: CUDA whole decode rel err {err:.2e}");
        assert!(err < 1e-2, "{name}: CUDA whole decode rel err {err}");
        let tiled = vae.decode(latents, Some(FIXTURE_TILES)).unwrap();
        let err = rel_err(&tiled, reference.get("image_tiled").unwrap());
        assert!(err < 1e-2, "{name}: CUDA tiled decode rel err {err}");
    }
}
