//! The `hiprune forward` and `hiprune sample` commands on the fixture models.

mod common;

use common::{fixture, rel_err};

use std::path::Path;
use std::process::{Command, Output};

use hiprune::model::{Tensor, TensorFile, write_tensors};

fn hiprune(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hiprune"))
        .args(args)
        .output()
        .unwrap()
}

fn forward(model: &Path, inputs: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "forward".as_ref(),
        model.as_os_str(),
        "--inputs".as_ref(),
        inputs.as_os_str(),
        "--output".as_ref(),
        out.as_os_str(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    hiprune(&args)
}

#[test]
fn forward_writes_the_diffusers_output() {
    let dir = tempfile::tempdir().unwrap();
    for (folder, extra, name) in [
        ("sd3", &[][..], "output"),
        ("mmditx", &["--remove-blocks", "1"][..], "output_removed_1"),
        (
            "sd35",
            &["--backend", "cpu", "--remove-blocks", "3"][..],
            "output_removed_last",
        ),
    ] {
        let out = dir.path().join(format!("{folder}.safetensors"));
        let res = forward(
            &fixture(folder),
            &fixture(folder).join("inputs.safetensors"),
            &out,
            extra,
        );
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let got = TensorFile::open(&out).unwrap();
        let want = TensorFile::open(fixture(folder).join("outputs.safetensors")).unwrap();
        let err = rel_err(got.get("output").unwrap(), want.get(name).unwrap());
        assert!(err <= 1e-4, "{folder}/{name}: {err}");
    }
    // Only the output file is left in the folder (no temp files).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

#[test]
fn forward_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let inputs = fixture("sd3").join("inputs.safetensors");

    let res = forward(&fixture("sd3"), &inputs, &out, &["--backend", "cuda"]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    if cfg!(feature = "cuda") {
        // A CUDA build runs where a device exists and says why not elsewhere.
        assert!(
            res.status.success() || stderr.contains("no usable CUDA device"),
            "{stderr}"
        );
        let _ = std::fs::remove_file(&out);
    } else {
        assert!(!res.status.success());
        assert!(stderr.contains("not built with CUDA"), "{stderr}");
    }

    // An input file without `timestep`.
    let src = TensorFile::open(&inputs).unwrap();
    let partial = dir.path().join("partial.safetensors");
    let names = [
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
    ];
    let tensors: Vec<(&str, &Tensor)> = names.iter().map(|n| (*n, src.get(n).unwrap())).collect();
    write_tensors(&partial, &tensors).unwrap();
    let res = forward(&fixture("sd3"), &partial, &out, &[]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("`timestep`"));

    // A block index outside the model.
    let res = forward(&fixture("sd3"), &inputs, &out, &["--remove-blocks", "9"]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("block 9"));
    assert!(!out.exists());
}

#[test]
fn sample_writes_the_diffusers_latent() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = fixture("sd35").join("sample_inputs.safetensors");
    let src = TensorFile::open(&inputs).unwrap();
    let init = dir.path().join("init.safetensors");
    write_tensors(&init, &[("latent", src.get("latent_init").unwrap())]).unwrap();
    let out = dir.path().join("latent.safetensors");
    let res = hiprune(&[
        "sample".as_ref(),
        fixture("sd35").as_os_str(),
        "--inputs".as_ref(),
        inputs.as_os_str(),
        "--steps".as_ref(),
        "4".as_ref(),
        "--guidance".as_ref(),
        "4.5".as_ref(),
        "--init-latent".as_ref(),
        init.as_os_str(),
        "--output".as_ref(),
        out.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(stderr.contains("step 4/4"), "{stderr}");
    let got = TensorFile::open(&out).unwrap();
    let want = TensorFile::open(fixture("sd35").join("sample_outputs.safetensors")).unwrap();
    let err = rel_err(
        got.get("latent").unwrap(),
        want.get("latent_final_cfg").unwrap(),
    );
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn sample_from_a_seed_has_the_requested_size() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = fixture("sd35").join("sample_inputs.safetensors");
    let out = dir.path().join("latent.safetensors");
    let res = hiprune(&[
        "sample".as_ref(),
        fixture("sd35").as_os_str(),
        "--inputs".as_ref(),
        inputs.as_os_str(),
        "--steps".as_ref(),
        "2".as_ref(),
        "--seed".as_ref(),
        "5".as_ref(),
        "--height".as_ref(),
        "6".as_ref(),
        "--width".as_ref(),
        "10".as_ref(),
        "--output".as_ref(),
        out.as_os_str(),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let got = TensorFile::open(&out).unwrap();
    let latent = got.get("latent").unwrap();
    assert_eq!(latent.shape, vec![1, 4, 6, 10]);
    assert!(latent.data.iter().all(|v| v.is_finite()));
}

/// `inspect` reports the weight bytes a loaded model holds with the one count the
/// C ABI (`hp_model_get_info`) and `bench model` use.
#[test]
fn inspect_reports_the_loaded_models_weight_bytes() {
    use hiprune::backend::Device;
    use hiprune::model::AnyModel;

    let dir = tempfile::tempdir().unwrap();
    let package = dir.path().join("sd35.hpk");
    let out = hiprune(&[
        "compress".as_ref(),
        fixture("sd35").as_os_str(),
        "-o".as_ref(),
        package.as_os_str(),
        "--weights".as_ref(),
        "int4".as_ref(),
        "--remove-blocks".as_ref(),
        "2".as_ref(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = hiprune(&["inspect".as_ref(), package.as_os_str(), "--json".as_ref()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let model = AnyModel::load_on(&package, Device::Cpu).unwrap();
    let held = serde_json::to_value(model.weight_bytes().unwrap()).unwrap();
    assert_eq!(report["weight_bytes"], held);
    assert!(held["int4"].as_u64().unwrap() > 0, "{held}");
    assert!(
        held["layers"]
            .as_object()
            .unwrap()
            .contains_key("int4sym g64"),
        "{held}"
    );
}

#[test]
fn single_files_run_inspect_and_compress_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let single = fixture("../single_file/sd35_pruned.safetensors");
    let out = dir.path().join("out.safetensors");
    let res = forward(
        &single,
        &fixture("sd35").join("inputs.safetensors"),
        &out,
        &["--head-dim", "8"],
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let got = TensorFile::open(&out).unwrap();
    let want = TensorFile::open(fixture("sd35").join("outputs.safetensors")).unwrap();
    let err = rel_err(
        got.get("output").unwrap(),
        want.get("output_removed_1").unwrap(),
    );
    assert!(err <= 1e-4, "{err:.3e}");

    // Without the head width the D = 16 fixture is refused, and the message says which
    // flag to give.
    let res = forward(
        &single,
        &fixture("sd35").join("inputs.safetensors"),
        &out,
        &[],
    );
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("--head-dim"), "{stderr}");

    let res = hiprune(&[
        "inspect".as_ref(),
        single.as_os_str(),
        "--head-dim".as_ref(),
        "8".as_ref(),
    ]);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(stdout.contains("single-file checkpoint"), "{stdout}");
    assert!(
        stdout.contains("missing blocks (1, a pruned model"),
        "{stdout}"
    );
    assert!(stdout.contains("[1]"), "{stdout}");

    let hpk = dir.path().join("pruned.hpk");
    let res = hiprune(&[
        "compress".as_ref(),
        single.as_os_str(),
        "-o".as_ref(),
        hpk.as_os_str(),
        "--head-dim".as_ref(),
        "8".as_ref(),
        "--weights".as_ref(),
        "f32".as_ref(),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let package = hiprune::Package::open(&hpk).unwrap();
    assert_eq!(package.manifest().kept_blocks, vec![0, 2, 3]);
    let res = hiprune(&["inspect".as_ref(), hpk.as_os_str()]);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(stdout.contains("removed blocks (1): [1]"), "{stdout}");

    // A package given to compress is named as one.
    let res = hiprune(&[
        "compress".as_ref(),
        hpk.as_os_str(),
        "-o".as_ref(),
        dir.path().join("again.hpk").as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(stderr.contains("already a hiprune package"), "{stderr}");
}
