//! `hiprune decode`: latents (what `hiprune sample` writes) to PNG through a VAE.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use hiprune::model::TensorFile;
use hiprune::pipeline::{AnyVaeDecoder, ImageMetadata, RgbImage, Tiling};
use hiprune::{Error, Result};

use crate::forward::BackendChoice;

/// Options of `hiprune decode`.
#[derive(Args)]
pub struct DecodeArgs {
    /// A diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors), or a
    /// pipeline folder holding one as `vae/`.
    vae: PathBuf,
    /// safetensors file holding the latents [B, C, H, W] (pipeline space, as sampled).
    #[arg(long)]
    latents: PathBuf,
    /// Name of the latent tensor in the file.
    #[arg(long, default_value = "latent")]
    tensor: String,
    /// Latent tile side for tiled decoding (bounded memory); 0 decodes whole.
    #[arg(long, default_value_t = Tiling::default().latent_tile)]
    tile: usize,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendChoice,
    /// Output PNG; with a batch of B > 1 latents, item i goes to `<stem>-<i>.png`.
    #[arg(short, long)]
    output: PathBuf,
}

/// The VAE folder `path` names: itself, or its `vae/` subfolder.
fn vae_folder(path: &Path) -> PathBuf {
    let inner = path.join("vae");
    if !path.join("config.json").is_file() && inner.join("config.json").is_file() {
        inner
    } else {
        path.to_path_buf()
    }
}

/// Where item `index` of `count` images goes.
fn output_for(path: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{stem}-{index}.png"))
}

/// Runs `hiprune decode`.
pub fn run(args: &DecodeArgs) -> Result<()> {
    let vae = vae_folder(&args.vae);
    let latents = TensorFile::open(&args.latents)?;
    let latent = latents.get(&args.tensor)?;
    let device = crate::forward::device_of(args.backend);
    let decoder = AnyVaeDecoder::load(&vae, device)?;
    let tiling = (args.tile > 0).then(|| Tiling {
        latent_tile: args.tile,
        ..Tiling::default()
    });
    eprintln!(
        "decoding {:?} latents on {device}{}",
        latent.shape,
        tiling.map_or(String::new(), |t| format!(
            " in {} x {} latent tiles",
            t.latent_tile, t.latent_tile
        ))
    );
    let start = Instant::now();
    let images = RgbImage::from_decoded(&decoder.decode(latent, tiling)?)?;
    eprintln!("decoded in {:.2} s", start.elapsed().as_secs_f64());
    if images.is_empty() {
        return Err(Error::invalid("latents", "the batch is empty"));
    }
    for (i, image) in images.iter().enumerate() {
        let metadata = ImageMetadata::default()
            .with("Software", format!("hiprune {}", env!("CARGO_PKG_VERSION")))
            .with("vae", vae.display())
            .with("latents", args.latents.display())
            .with("batch item", i);
        let path = output_for(&args.output, i, images.len());
        image.write_png(&path, &metadata)?;
        println!("{} ({} x {})", path.display(), image.width, image.height);
    }
    Ok(())
}
