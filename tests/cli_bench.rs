//! `hiprune bench kernels` and `hiprune bench model`: reports parse and hold their
//! fields, both models are measured, bad input fails with a message naming the problem.

use std::path::Path;
use std::process::{Command, Output};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn hiprune<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hiprune"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("run hiprune")
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "hiprune failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Asserts the command fails and its stderr mentions every one of `needles`.
fn fails_naming(args: &[&str], needles: &[&str]) {
    let out = hiprune(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks `{n}`: {err}");
    }
}

fn check_header(h: &Value, backend: &str) {
    for key in ["version", "git_revision", "os", "cpu", "kernel_path"] {
        let v = h[key]
            .as_str()
            .unwrap_or_else(|| panic!("header.{key}: {h}"));
        assert!(!v.is_empty(), "header.{key} is empty");
    }
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(h["backend"], backend);
    assert_eq!(h["threads"], 2);
    assert!(h["cpu_threads_available"].as_u64().unwrap() >= 1);
    assert!(h["gpu"].is_null());
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("field `{key}` missing or not a number in {v}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("field `{key}` missing or not an integer in {v}"))
}

#[test]
fn kernels_json_on_custom_shapes_has_every_cell_and_field() {
    let mut rng = StdRng::seed_from_u64(7);
    // K must be a multiple of the group (64); N and M awkward.
    let (k1, n1) = (
        64 * rng.random_range(1..4usize),
        rng.random_range(1..97usize),
    );
    let (k2, n2) = (
        64 * rng.random_range(4..6usize),
        rng.random_range(97..200usize),
    );
    let m = rng.random_range(2..9usize);
    // The second copy of the first shape is dropped.
    let shapes = format!("{k1},{n1}; {k2},{n2};{k1},{n1}");
    let ms = format!("1,{m}");
    let out = hiprune(&[
        "bench",
        "kernels",
        "--shapes",
        &shapes,
        "--m",
        &ms,
        "--weights",
        "int4,nf4,f16,int4-a8",
        "--seconds",
        "0",
        "--hot",
        "--json",
    ]);
    let report = stdout_json(&out);
    check_header(&report["header"], "cpu");
    assert!(f(&report, "read_bandwidth_gbps") > 0.0);
    assert_eq!(
        f(&report, "bandwidth_gbps"),
        f(&report, "read_bandwidth_gbps")
    );
    assert_eq!(report["baseline"], "f32");
    assert_eq!(report["streamed"], false);
    let results = report["results"].as_array().unwrap();
    // 2 shapes x 2 M x (f32 baseline + 4 variants).
    assert_eq!(results.len(), 2 * 2 * 5);
    for r in results {
        let (k, n, mm) = (u(r, "k") as usize, u(r, "n") as usize, u(r, "m") as usize);
        assert!([(k1, n1), (k2, n2)].contains(&(k, n)), "{r}");
        assert!(mm == 1 || mm == m);
        let (min, med, max) = (f(r, "min_s"), f(r, "median_s"), f(r, "max_s"));
        assert!(min > 0.0 && min <= med && med <= max, "{r}");
        assert!(f(r, "q1_s") <= med && med <= f(r, "q3_s"), "{r}");
        assert!(u(r, "runs") >= 3);
        assert!(f(r, "gbps") > 0.0 && f(r, "gflops") > 0.0 && f(r, "speedup_vs_baseline") > 0.0);
        assert_eq!(r["kernel"], "cpu");
        assert_eq!(u(r, "launches_per_run"), 1);
        let expect_w = match r["weights"].as_str().unwrap() {
            "f32" => 4 * n * k,
            "f16" => 2 * n * k,
            // `--weights int4` is symmetric (f16 scales only); int4-a8 runs asymmetric
            // INT4 (f16 scale and offset per group).
            "int4sym" | "nf4" => n * k / 2 + 2 * n * (k / 64),
            "int4" | "int4-a8" => n * k / 2 + 4 * n * (k / 64),
            other => panic!("unexpected weights {other}"),
        };
        assert_eq!(u(r, "weight_bytes") as usize, expect_w, "{r}");
        assert_eq!(
            u(r, "bytes_moved") as usize,
            expect_w + 4 * (mm * k + mm * n),
            "{r}"
        );
        let frac = f(r, "fraction_of_bandwidth");
        let expect = f(r, "gbps") / f(&report, "read_bandwidth_gbps");
        assert!((frac - expect).abs() <= 1e-9 * expect.max(1.0));
        if r["weights"] == "f32" {
            assert!((f(r, "speedup_vs_baseline") - 1.0).abs() < 1e-12);
        }
        assert_eq!(u(r, "layers_in_model"), 0);
    }
}

#[test]
fn kernels_csv_has_header_comments_and_one_row_per_cell() {
    let out = hiprune(&[
        "bench",
        "kernels",
        "--shapes",
        "128,40",
        "--m",
        "3",
        "--weights",
        "nf4",
        "--seconds",
        "0",
        "--hot",
        "--csv",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let comments: Vec<&str> = text.lines().filter(|l| l.starts_with('#')).collect();
    for key in [
        "# hiprune:",
        "# cpu:",
        "# kernel path:",
        "# os:",
        "# threads:",
    ] {
        assert!(
            comments.iter().any(|l| l.starts_with(key)),
            "no `{key}` in {text}"
        );
    }
    let rows: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(rows.len(), 3, "{text}");
    let cols = rows[0].split(',').count();
    assert!(rows[0].starts_with("k,n,m,"));
    assert!(rows[1].starts_with("128,40,3,0,f32,cpu,"));
    assert!(rows[2].starts_with("128,40,3,0,nf4,cpu,"));
    assert!(rows.iter().all(|r| r.split(',').count() == cols));
}

#[test]
fn kernel_family_shapes_come_from_the_model_layout() {
    // Every linear shape of SD3.5 Medium, counted from the layout, with a tiny time budget
    // and only M = 1 so the run stays short.
    let out = hiprune(&[
        "bench",
        "kernels",
        "--shapes",
        "sd35-medium",
        "--m",
        "1",
        "--weights",
        "int4",
        "--seconds",
        "0",
        "--hot",
        "--json",
    ]);
    let report = stdout_json(&out);
    let results = report["results"].as_array().unwrap();
    let mut shapes: Vec<(u64, u64, u64)> = results
        .iter()
        .filter(|r| r["weights"] == "f32")
        .map(|r| (u(r, "k"), u(r, "n"), u(r, "layers_in_model")))
        .collect();
    let cfg = hiprune::model::MmditConfig::sd35_medium();
    let mut expect = std::collections::BTreeMap::new();
    for req in hiprune::model::layout::required_tensors(&cfg, &hiprune::model::PruneSpec::none()) {
        if let hiprune::model::layout::Required::Linear { n, k, .. } = req {
            *expect.entry((k as u64, n as u64)).or_insert(0u64) += 1;
        }
    }
    shapes.sort();
    let expect: Vec<(u64, u64, u64)> = expect.into_iter().map(|((k, n), c)| (k, n, c)).collect();
    assert_eq!(shapes, expect);
    // D = 1536: the attention projections, the 9D MMDiT-X modulation and the FFN.
    assert!(shapes.iter().any(|s| (s.0, s.1) == (1536, 13824)));
    assert!(shapes.iter().any(|s| (s.0, s.1) == (6144, 1536)));
}

fn check_model_run(m: &Value, steps: usize) {
    for key in [
        "weight_bytes",
        "linear_weight_bytes",
        "peak_rss_bytes",
        "blocks_run",
    ] {
        assert!(u(m, key) > 0, "{key} in {m}");
    }
    assert_eq!(
        u(m, "weight_bytes"),
        u(m, "linear_weight_bytes") + u(m, "other_weight_bytes")
    );
    assert!(u(m, "peak_rss_bytes") >= u(m, "rss_before_sampling_bytes"));
    assert_eq!(
        u(m, "scratch_bytes"),
        u(m, "peak_rss_bytes") - u(m, "rss_before_sampling_bytes")
    );
    let steps_s = m["step_s"].as_array().unwrap();
    assert_eq!(steps_s.len(), steps);
    let (min, med, max) = (
        f(m, "step_min_s"),
        f(m, "step_median_s"),
        f(m, "step_max_s"),
    );
    assert!(min > 0.0 && min <= med && med <= max, "{m}");
    let sum: f64 = steps_s.iter().map(|v| v.as_f64().unwrap()).sum();
    assert!(f(m, "sampling_s") >= sum * 0.999, "{m}");
}

#[test]
fn model_generate_tiny_reports_both_models() {
    let out = hiprune(&[
        "bench",
        "model",
        "--generate",
        "tiny",
        "--steps",
        "1",
        "--remove-blocks",
        "2",
        "--json",
    ]);
    let report = stdout_json(&out);
    check_header(&report["header"], "cpu");
    let s = &report["settings"];
    assert_eq!(s["steps"], 1);
    assert_eq!(s["context_tokens"], 333);
    // Tiny: sample_size 16 latent -> 128 px, patch 2 -> 8x8 = 64 image tokens.
    assert_eq!(s["resolution"], 128);
    assert_eq!(s["image_tokens"], 64);
    let models = report["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["label"], "dense f16");
    assert_eq!(models[1]["label"], "compressed");
    for m in models {
        check_model_run(m, 1);
    }
    assert_eq!(u(&models[0], "blocks_run"), 4);
    assert_eq!(u(&models[1], "blocks_run"), 3);
    assert!(models[0]["linear_formats"]["f16"].as_u64().unwrap() > 0);
    // `--weights int4` (the default) is symmetric INT4.
    assert!(models[1]["linear_formats"]["int4sym g64"].as_u64().unwrap() > 0);
    let (dense, comp) = (u(&models[0], "weight_bytes"), u(&models[1], "weight_bytes"));
    assert!(comp < dense, "{comp} !< {dense}");
    let c = &report["comparison"];
    let expect = 1.0 - comp as f64 / dense as f64;
    assert!((f(c, "weight_bytes_reduction") - expect).abs() < 1e-12);
    let speed = f(&models[0], "step_median_s") / f(&models[1], "step_median_s");
    assert!((f(c, "step_speedup") - speed).abs() < 1e-9 * speed);
    // The temporary folder is gone.
    let tmp = models[0]["source"].as_str().unwrap();
    assert!(!Path::new(tmp).exists(), "{tmp} left behind");
}

#[test]
fn model_on_a_package_finds_its_original_only_when_present() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let hpk = dir.path().join("model.hpk");
    let ok = |out: Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(hiprune(&[
        "generate".as_ref(),
        ckpt.as_os_str(),
        "--preset".as_ref(),
        "tiny".as_ref(),
    ]));
    ok(hiprune(&[
        "compress".as_ref(),
        ckpt.as_os_str(),
        "-o".as_ref(),
        hpk.as_os_str(),
        "--weights".as_ref(),
        "nf4".as_ref(),
        "--remove-blocks".as_ref(),
        "1".as_ref(),
    ]));
    let bench = |path: &Path| {
        stdout_json(&hiprune(&[
            "bench".as_ref(),
            "model".as_ref(),
            path.as_os_str(),
            "--steps".as_ref(),
            "2".as_ref(),
            "--resolution".as_ref(),
            "64".as_ref(),
            "--context-tokens".as_ref(),
            "5".as_ref(),
            "--json".as_ref(),
        ]))
    };
    let report = bench(&hpk);
    let models = report["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "{report}");
    assert_eq!(models[0]["label"], "original");
    assert_eq!(u(&models[0], "blocks_run"), 4);
    assert_eq!(u(&models[1], "blocks_run"), 3);
    assert!(models[1]["linear_formats"]["nf4 g64"].as_u64().unwrap() > 0);
    for m in models {
        check_model_run(m, 2);
    }
    assert!(report["comparison"].is_object());

    // Alone in another folder: only the package, and a note saying why.
    let other = tempfile::tempdir().unwrap();
    let moved = other.path().join("model.hpk");
    std::fs::copy(&hpk, &moved).unwrap();
    let report = bench(&moved);
    let models = report["models"].as_array().unwrap();
    assert_eq!(models.len(), 1);
    assert_eq!(models[0]["label"], "compressed");
    assert!(report["comparison"].is_null());
    let notes = report["settings"]["notes"].to_string();
    assert!(notes.contains("not available"), "{notes}");
}

#[test]
fn model_csv_and_table_name_both_models() {
    let args = [
        "bench",
        "model",
        "--generate",
        "tiny",
        "--steps",
        "1",
        "--context-tokens",
        "7",
    ];
    let out = hiprune(&[&args[..], &["--csv"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().any(|l| l.starts_with("# cpu:")));
    let rows: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert!(rows[1].starts_with("dense f16,4,4,"));
    assert!(rows[2].starts_with("compressed,4,4,"));

    let out = hiprune(&args);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "hiprune bench model",
        "kernel path",
        "dense f16",
        "compressed",
        "peak RSS",
    ] {
        assert!(text.contains(needle), "no `{needle}` in {text}");
    }
    // Progress goes to stderr, one line per step.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step 1/1"), "{err}");
}

#[test]
fn bad_kernel_input_fails_naming_the_problem() {
    let k = ["bench", "kernels", "--seconds", "0", "--hot", "--m", "1"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { [&k[..], extra].concat() };
    fails_naming(
        &with(&["--shapes", "sd35-huge"]),
        &["--shapes", "sd35-huge"],
    );
    fails_naming(&with(&["--shapes", "128,x"]), &["--shapes", "128,x"]);
    fails_naming(&with(&["--shapes", "128,64,3"]), &["128,64,3"]);
    fails_naming(&with(&["--shapes", "0,64"]), &["0,64"]);
    fails_naming(&with(&["--shapes", ";"]), &["--shapes"]);
    fails_naming(
        &with(&["--shapes", "100,64"]),
        &["K = 100", "group size 64"],
    );
    fails_naming(
        &["bench", "kernels", "--shapes", "128,64", "--m", "1,0"],
        &["--m", "`0`"],
    );
    fails_naming(
        &["bench", "kernels", "--shapes", "128,64", "--m", "two"],
        &["--m", "`two`"],
    );
    fails_naming(&with(&["--weights", "int3"]), &["--weights", "int3"]);
    #[cfg(not(feature = "cuda"))]
    fails_naming(
        &with(&["--backend", "cuda"]),
        &["built without CUDA support", "cuda"],
    );
    fails_naming(&with(&["--backend", "tpu"]), &["tpu"]);
}

#[test]
fn bad_model_input_fails_naming_the_problem() {
    let g = ["bench", "model", "--generate", "tiny", "--steps", "1"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { [&g[..], extra].concat() };
    fails_naming(
        &["bench", "model", "--generate", "sd35-huge"],
        &["--generate", "sd35-huge"],
    );
    // Tiny: patch 2, so a multiple of 16 px; the 16x16 table allows 256 px at most.
    fails_naming(
        &with(&["--resolution", "100"]),
        &["--resolution", "multiple of 16"],
    );
    fails_naming(&with(&["--resolution", "0"]), &["--resolution"]);
    fails_naming(
        &with(&["--resolution", "512"]),
        &["--resolution", "positional table", "256 px"],
    );
    fails_naming(&with(&["--weights", "int2"]), &["--weights", "int2"]);
    fails_naming(&with(&["--context-tokens", "0"]), &["--context-tokens"]);
    fails_naming(&with(&["--remove-blocks", "9"]), &["block 9"]);
    fails_naming(&with(&["--remove-blocks", "x"]), &["`x`"]);
    fails_naming(
        &with(&["--preset", "sd35-medium"]),
        &["sd35-medium", "24-block"],
    );
    fails_naming(
        &["bench", "model", "--generate", "tiny", "--steps", "0"],
        &["--steps"],
    );
    #[cfg(not(feature = "cuda"))]
    fails_naming(
        &with(&["--backend", "cuda"]),
        &["built without CUDA support"],
    );
    fails_naming(&["bench", "model"], &["<MODEL>"]);
    fails_naming(
        &["bench", "model", "/nonexistent/model.hpk", "--steps", "1"],
        &["/nonexistent/model.hpk"],
    );
}

/// Whether a missing GPU must fail the CUDA tests instead of skipping them.
#[cfg(feature = "cuda")]
fn gpu_required() -> bool {
    std::env::var("HIPRUNE_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// In a CUDA build: with a device, the kernel report has the cuBLAS baseline and every
/// 4-bit variant per cell and the card in its header; without one, a clear error and
/// no panic.
#[cfg(feature = "cuda")]
#[test]
fn cuda_kernels_report_or_fail_cleanly_without_a_device() {
    let mut rng = StdRng::seed_from_u64(31);
    let (k1, n1) = (
        64 * rng.random_range(2..5usize),
        rng.random_range(1..80usize),
    );
    let (k2, n2) = (
        64 * rng.random_range(5..9usize),
        rng.random_range(80..300usize),
    );
    let m = rng.random_range(9..40usize);
    let shapes = format!("{k1},{n1};{k2},{n2}");
    let ms = format!("1,{m}");
    let out = hiprune(&[
        "bench",
        "kernels",
        "--backend",
        "cuda",
        "--shapes",
        &shapes,
        "--m",
        &ms,
        "--weights",
        "int4,int4-asym,nf4,f16",
        "--seconds",
        "0",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if !out.status.success() {
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("no usable CUDA device"), "{err}");
        assert!(!gpu_required(), "HIPRUNE_REQUIRE_GPU=1 but: {err}");
        eprintln!("skipped: no CUDA device ({})", err.trim());
        return;
    }
    let report = stdout_json(&out);
    let gpu = &report["header"]["gpu"];
    assert!(!gpu["name"].as_str().unwrap().is_empty(), "{gpu}");
    assert!(gpu["compute_capability"].as_str().unwrap().contains('.'));
    assert!(u(gpu, "memory_bytes") > 0);
    assert_eq!(report["baseline"], "f16 (cuBLAS)");
    assert!(report.get("read_bandwidth_gbps").is_none());
    let bw = f(&report, "bandwidth_gbps");
    assert!(bw > 0.0);
    let results = report["results"].as_array().unwrap();
    // 2 shapes x 2 M x (cuBLAS f16 + 3 four-bit variants; f16 is the baseline itself).
    assert_eq!(results.len(), 2 * 2 * 4, "{report}");
    for r in results {
        let (k, n, mm) = (u(r, "k") as usize, u(r, "n") as usize, u(r, "m") as usize);
        assert!([(k1, n1), (k2, n2)].contains(&(k, n)), "{r}");
        let (min, med, max) = (f(r, "min_s"), f(r, "median_s"), f(r, "max_s"));
        assert!(min > 0.0 && min <= med && med <= max, "{r}");
        assert!(u(r, "runs") >= 3 && u(r, "launches_per_run") >= 1);
        let kernel = r["kernel"].as_str().unwrap();
        match r["weights"].as_str().unwrap() {
            "f16" => {
                assert_eq!(kernel, "cublas");
                assert_eq!(u(r, "weight_bytes") as usize, 2 * n * k);
                assert!((f(r, "speedup_vs_baseline") - 1.0).abs() < 1e-12);
            }
            "int4sym" | "int4" | "nf4" => {
                assert_eq!(kernel, if mm <= 8 { "gemv" } else { "gemm" }, "{r}");
                assert!(u(r, "weight_bytes") as usize >= n * k / 2, "{r}");
            }
            other => panic!("unexpected weights {other}"),
        }
        assert_eq!(
            u(r, "bytes_moved"),
            u(r, "weight_bytes") + 2 * (mm * k + mm * n) as u64
        );
        let frac = f(r, "fraction_of_bandwidth");
        assert!((frac - f(r, "gbps") / bw).abs() <= 1e-9 * frac.max(1.0));
    }
}

/// int8 activations are a CPU kernel: refused on CUDA before a device is needed.
#[cfg(feature = "cuda")]
#[test]
fn cuda_kernels_refuse_int8_activations() {
    fails_naming(
        &[
            "bench",
            "kernels",
            "--backend",
            "cuda",
            "--shapes",
            "128,64",
            "--m",
            "1",
            "--weights",
            "int4-a8",
            "--seconds",
            "0",
        ],
        &["int4-a8", "CPU"],
    );
}

/// In a CUDA build: `bench model --backend cuda` either runs or fails with a clear
/// message (no device, or the model not yet on CUDA in this build), never a panic,
/// and never after generating weights it cannot run.
#[cfg(feature = "cuda")]
#[test]
fn cuda_model_runs_or_fails_cleanly() {
    let out = hiprune(&[
        "bench",
        "model",
        "--generate",
        "tiny",
        "--steps",
        "1",
        "--backend",
        "cuda",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if out.status.success() {
        let report = stdout_json(&out);
        let models = report["models"].as_array().unwrap();
        assert_eq!(models.len(), 2);
        for m in models {
            let d = &m["device_memory"];
            assert!(u(d, "weights_bytes") > 0 && u(d, "peak_bytes") >= u(d, "weights_bytes"));
            assert_eq!(u(m, "weight_bytes"), u(d, "weights_bytes"));
        }
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    let not_built = err.contains("does not run on CUDA in this build");
    assert!(not_built || err.contains("no usable CUDA device"), "{err}");
    if not_built {
        assert!(
            !err.contains("generating"),
            "failed only after generating: {err}"
        );
    } else {
        assert!(!gpu_required(), "HIPRUNE_REQUIRE_GPU=1 but: {err}");
    }
}
