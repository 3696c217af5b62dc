//! `hiprune decode`: latents in a safetensors file to PNG through the fixture VAEs.

mod common;

use std::process::{Command, Output};

use hiprune::model::{TensorFile, write_tensors};

fn hiprune(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hiprune"))
        .args(args)
        .output()
        .unwrap()
}

fn png_size(path: &std::path::Path) -> (u32, u32) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let info = png::Decoder::new(file).read_info().unwrap();
    (info.info().width, info.info().height)
}

#[test]
fn decode_writes_one_png_per_batch_item() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = common::fixture("../vae/sd3");
    let reference = TensorFile::open(fixture.join("reference.safetensors")).unwrap();
    let latents = dir.path().join("latents.safetensors");
    write_tensors(&latents, &[("latent", reference.get("latents").unwrap())]).unwrap();
    let out = dir.path().join("image.png");
    // The pipeline folder (with `vae/` inside) is accepted as well as the VAE folder.
    let run = hiprune(&[
        "decode".as_ref(),
        fixture.as_os_str(),
        "--latents".as_ref(),
        latents.as_os_str(),
        "--tile".as_ref(),
        "4".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for i in 0..2 {
        let path = dir.path().join(format!("image-{i}.png"));
        assert_eq!(png_size(&path), (28, 44), "{}", path.display());
    }
    assert!(!out.exists());
}

#[test]
fn decode_into_a_missing_folder_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = common::fixture("../vae/sd3/vae");
    let reference = TensorFile::open(common::fixture("../vae/sd3/reference.safetensors")).unwrap();
    let latents = dir.path().join("latents.safetensors");
    write_tensors(&latents, &[("latent", reference.get("latents").unwrap())]).unwrap();
    let out = dir.path().join("missing/image.png");
    let run = hiprune(&[
        "decode".as_ref(),
        fixture.as_os_str(),
        "--latents".as_ref(),
        latents.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("does not exist"), "{stderr}");
    // A tensor name the file lacks is named.
    let run = hiprune(&[
        "decode".as_ref(),
        fixture.as_os_str(),
        "--latents".as_ref(),
        latents.as_os_str(),
        "--tensor".as_ref(),
        "nope".as_ref(),
        "-o".as_ref(),
        dir.path().join("x.png").as_os_str(),
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("nope"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
