//! The VAE decoder against diffusers' `AutoencoderKL` (fixtures written by
//! `tests/fixtures/vae/make_vae_fixtures.py`): whole and tiled decoding in f32, the
//! 8-bit image, PNG output, and clear errors for bad input.

mod common;

use hiprune::backend::{CpuBackend, Device};
use hiprune::model::Tensor;
use hiprune::pipeline::{ImageMetadata, RgbImage, Tiling, VaeDecoder};

use common::{
    VAE_FIXTURE_TILES as FIXTURE_TILES, rel_err, vae_fixture, vae_reference as reference,
};

fn load(name: &str) -> VaeDecoder<CpuBackend> {
    VaeDecoder::load(vae_fixture(name).join("vae"), Device::Cpu).unwrap()
}

#[test]
fn decode_matches_diffusers_whole_and_tiled() {
    for name in ["sd3", "sd"] {
        let vae = load(name);
        let reference = reference(name);
        let latents = reference.get("latents").unwrap();
        let image = vae.decode(latents, None).unwrap();
        let err = rel_err(&image, reference.get("image").unwrap());
        println!("{name}: whole decode rel err {err:.2e}");
        assert!(err < 1e-4, "{name}: whole decode rel err {err}");

        let tiled = vae.decode(latents, Some(FIXTURE_TILES)).unwrap();
        let err = rel_err(&tiled, reference.get("image_tiled").unwrap());
        println!("{name}: tiled decode rel err {err:.2e}");
        assert!(err < 1e-4, "{name}: tiled decode rel err {err}");
        // Tiles change the GroupNorm statistics: the two decodes must differ.
        assert!(
            rel_err(&tiled, &image) > 1e-3,
            "{name}: tiling had no effect"
        );
    }
}

#[test]
fn a_latent_within_one_tile_decodes_whole() {
    let vae = load("sd3");
    let reference = reference("sd3");
    let latents = reference.get("latents").unwrap();
    let big_tiles = Tiling {
        latent_tile: 11,
        overlap: 0.25,
    };
    let image = vae.decode(latents, Some(big_tiles)).unwrap();
    assert!(rel_err(&image, reference.get("image").unwrap()) < 1e-4);
}

#[test]
fn pixels_match_the_diffusers_image_processor() {
    let reference = reference("sd3");
    let image = load("sd3")
        .decode(reference.get("latents").unwrap(), None)
        .unwrap();
    let images = RgbImage::from_decoded(&image).unwrap();
    let pixels = reference.get("pixels").unwrap();
    assert_eq!(pixels.shape, vec![2, 44, 28, 3]);
    assert_eq!(images.len(), 2);
    let mut off_by_one = 0;
    for (b, rgb) in images.iter().enumerate() {
        assert_eq!((rgb.width, rgb.height), (28, 44));
        let expected = &pixels.data[b * 44 * 28 * 3..(b + 1) * 44 * 28 * 3];
        for (&got, &want) in rgb.data.iter().zip(expected) {
            let diff = (f32::from(got) - want).abs();
            assert!(diff <= 1.0, "pixel {got} against {want}");
            off_by_one += usize::from(diff > 0.0);
        }
    }
    // Rounding can flip a channel whose value sits on a half step; almost none do.
    assert!(off_by_one <= 4, "{off_by_one} channels off by one");
}

#[test]
fn png_round_trips_pixels_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.png");
    let image = RgbImage {
        width: 5,
        height: 3,
        data: (0..45u8).map(|v| v.wrapping_mul(37)).collect(),
    };
    let metadata = ImageMetadata::default()
        .with("prompt", "a café at dusk, 夕暮れ")
        .with("seed", 42);
    image.write_png(&path, &metadata).unwrap();

    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0u8; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (5, 3));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(&buf[..info.buffer_size()], image.data.as_slice());
    let texts: Vec<(String, String)> = reader
        .info()
        .utf8_text
        .iter()
        .map(|c| (c.keyword.clone(), c.get_text().unwrap()))
        .collect();
    assert_eq!(texts, metadata.entries);
    // Only the PNG is left in the folder: no temporary file.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn png_into_a_missing_folder_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("out.png");
    let image = RgbImage {
        width: 1,
        height: 1,
        data: vec![1, 2, 3],
    };
    let err = image
        .write_png(&path, &ImageMetadata::default())
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(!path.exists());
    let bad = RgbImage {
        width: 2,
        height: 1,
        data: vec![1, 2, 3],
    };
    let err = bad
        .write_png(dir.path().join("bad.png"), &ImageMetadata::default())
        .unwrap_err();
    assert!(err.to_string().contains("RGB image bytes"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn bad_latents_and_folders_are_clear_errors() {
    let vae = load("sd3");
    let wrong_channels = Tensor::zeros(vec![1, 4, 3, 3]);
    let err = vae.decode(&wrong_channels, None).unwrap_err();
    assert!(err.to_string().contains("latents"), "{err}");
    let not_4d = Tensor::zeros(vec![16, 3, 3]);
    assert!(vae.decode(&not_4d, None).is_err());
    let empty = Tensor::zeros(vec![1, 16, 0, 3]);
    assert!(vae.decode(&empty, None).is_err());

    let missing = VaeDecoder::<CpuBackend>::load(vae_fixture("nowhere"), Device::Cpu).unwrap_err();
    assert!(missing.to_string().contains("config.json"), "{missing}");
    // The transformer folder of the MMDiT fixtures is not a VAE.
    let transformer =
        VaeDecoder::<CpuBackend>::load(common::fixture("sd3"), Device::Cpu).unwrap_err();
    assert!(
        transformer.to_string().contains("AutoencoderKL"),
        "{transformer}"
    );
}

#[test]
fn a_missing_or_misshapen_tensor_is_named() {
    // The sd VAE's weights under the sd3 config: conv_in has 4 input channels, not 16.
    let config =
        hiprune::pipeline::VaeConfig::from_file(vae_fixture("sd3/vae/config.json")).unwrap();
    let weights =
        std::sync::Arc::new(hiprune::model::Weights::from_folder(vae_fixture("sd/vae")).unwrap());
    let err = VaeDecoder::from_weights(config, weights, CpuBackend::new()).unwrap_err();
    assert!(err.to_string().contains("decoder."), "{err}");
}
