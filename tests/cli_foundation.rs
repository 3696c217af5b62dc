//! The `hiprune` binary: inspect (table, JSON, --verify on a corrupted package), demo on a
//! small model, and clear errors for bad bench arguments.

use std::path::Path;
use std::process::Command;

use half::f16;
use hiprune::PackageWriter;
use hiprune::format::{PackageInfo, Precision, Provenance};
use hiprune::quant::{Int4Options, quantize_int4, quantize_nf4};

fn hiprune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hiprune"))
        .args(args)
        .output()
        .expect("the hiprune binary runs")
}

fn write_package(path: &Path) {
    let (n, k) = (48, 128);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0)
        .collect();
    let bias: Vec<f32> = (0..n).map(|i| i as f32 / 100.0).collect();
    let mut writer = PackageWriter::create(path).unwrap();
    writer
        .add_q4_layer(
            "blocks.0.int4",
            &quantize_int4(&w, n, k, &Int4Options::default()).unwrap(),
            Some(&bias),
        )
        .unwrap();
    writer
        .add_q4_layer("blocks.0.nf4", &quantize_nf4(&w, n, k, 64).unwrap(), None)
        .unwrap();
    let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    writer
        .add_dense_layer(
            "blocks.0.f16",
            Precision::F16,
            n,
            k,
            bytemuck::cast_slice(&w16),
            None,
        )
        .unwrap();
    writer
        .add_f32("blocks.0.norm.weight", &[k], &vec![1.0; k])
        .unwrap();
    let provenance = Provenance {
        source: "cli test".into(),
        ..Provenance::default()
    };
    writer
        .finish(PackageInfo {
            architecture: None,
            kept_blocks: Vec::new(),
            provenance,
            removed_components: Vec::new(),
        })
        .unwrap();
}

#[test]
fn inspect_prints_layers_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layers.hpk");
    write_package(&path);
    let out = hiprune(&["inspect", path.to_str().unwrap(), "--verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "blocks.0.int4",
        "int4/g64",
        "nf4/b64",
        "f16",
        "all checksums verified",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    let out = hiprune(&["inspect", path.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["layers"].as_array().unwrap().len(), 3);
    let int4 = &json["layers"][0];
    assert_eq!(int4["precision"], "int4/g64");
    // 48 x 128 codes at 4 bits, scales and offsets per 64, an f32 bias.
    assert_eq!(int4["bytes"], 48 * 64 + 2 * 2 * 48 * 2 + 48 * 4);
    assert_eq!(int4["dense_f16_bytes"], 2 * (48 * 128 + 48));
    assert!(json["reduction_vs_f16"].as_f64().unwrap() > 0.2);
}

#[test]
fn inspect_verify_reports_a_corrupted_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layers.hpk");
    write_package(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let start = header["blocks.0.norm.weight"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    bytes[8 + header_len + start + 1] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    assert!(
        hiprune(&["inspect", path.to_str().unwrap()])
            .status
            .success(),
        "open does not hash"
    );
    let out = hiprune(&["inspect", path.to_str().unwrap(), "--verify"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("checksum") && err.contains("blocks.0.norm.weight"),
        "{err}"
    );
}

#[test]
fn inspect_rejects_a_truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layers.hpk");
    write_package(&path);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let out = hiprune(&["inspect", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
}

#[test]
fn demo_runs_on_a_small_model() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("demo");
    let out = hiprune(&[
        "demo",
        "--hidden",
        "64",
        "--layers",
        "4",
        "--remove",
        "1",
        "--steps",
        "2",
        "--latent",
        "8",
        "--keep",
        keep.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in ["original (f16)", "pruned + INT4", "step latency", "smaller"] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    let package = keep.join("model.hpk");
    assert!(package.exists(), "--keep leaves the package");
    assert!(keep.join("report.json").exists() && keep.join("report.svg").exists());
    let inspect = hiprune(&["inspect", package.to_str().unwrap(), "--verify"]);
    assert!(inspect.status.success());
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("kept blocks (3)"));
}

#[test]
fn bench_kernels_rejects_bad_arguments() {
    for (args, needle) in [
        (vec!["bench", "kernels", "--shapes", "12,x"], "--shapes"),
        (vec!["bench", "kernels", "--shapes", "100,64"], "K = 100"),
        (vec!["bench", "kernels", "--m", "0"], "--m"),
        (vec!["bench", "kernels", "--weights", "int3"], "int3"),
        (vec!["bench", "kernels", "--backend", "cuda"], "cuda"),
    ] {
        let out = hiprune(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: `{needle}` not in {err}");
    }
}

#[test]
fn bench_kernels_runs_a_tiny_shape_as_json() {
    let out = hiprune(&[
        "bench",
        "kernels",
        "--shapes",
        "128,40",
        "--m",
        "1,3",
        "--seconds",
        "0.01",
        "--hot",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 2 * 3, "f32, int4 and nf4 at two values of M");
    assert!(
        results
            .iter()
            .all(|r| r["median_s"].as_f64().unwrap() > 0.0)
    );
    assert!(json["read_bandwidth_gbps"].as_f64().unwrap() > 0.0);
}
