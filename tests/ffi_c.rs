//! The C interface from C: the header compiles as C99 and C++17, `ffi/tests/smoke.c`
//! and `ffi/tests/misuse.c` build against both the static and the shared library of
//! this very `cargo test` build and pass, their numbers equal the Rust API's and the
//! diffusers fixtures, valgrind finds no errors and no definite leaks, and the shared
//! library exports exactly the header's functions.
//!
//! Needs a C compiler (`cc`, `c++`); valgrind is optional here (the test says when it
//! skips) and installed by `.ci/run`, which sets `HIPRUNE_REQUIRE_VALGRIND=1` to turn
//! the skip into a failure.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use hiprune::model::sampler::{Conditioning, SampleOptions, sample};
use hiprune::model::{Mmdit, MmditInputs, Tensor, TensorFile};

const CFLAGS: &[&str] = &["-std=c99", "-Wall", "-Wextra", "-Werror", "-Wpedantic"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/mmdit/sd35").join(name)
}

/// The folder holding the `libhiprune.{a,so}` of this very test build. Cargo builds
/// the library's staticlib and cdylib crate types in the same rustc run as the rlib
/// the tests link, into `target/<profile>/deps/` next to the test executable (only
/// `cargo build` copies them up to `target/<profile>/`), so look there first.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    let dir = if deps.join("libhiprune.a").is_file() {
        deps
    } else {
        deps.parent().unwrap().to_path_buf()
    };
    for lib in ["libhiprune.a", "libhiprune.so"] {
        assert!(
            dir.join(lib).is_file(),
            "{} missing: the staticlib/cdylib crate types should be built with the tests",
            dir.join(lib).display()
        );
    }
    dir
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout + &stderr
}

/// Compresses the `sd35` fixture folder into an all-f32 package with `hiprune compress`
/// (f32 keeps it exact, so C, Rust and diffusers can be compared tightly).
fn build_package(path: &Path) {
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_hiprune"))
            .arg("compress")
            .arg(fixture(""))
            .arg("-o")
            .arg(path)
            .args(["--weights", "f32"]),
    );
}

fn write_f32(dir: &Path, name: &str, t: &Tensor) {
    let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn read_f32(dir: &Path, name: &str) -> Vec<f32> {
    std::fs::read(dir.join(name))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Compiled programs and their inputs, built once per test process.
struct Setup {
    dir: PathBuf,
    package: PathBuf,
    corrupt: PathBuf,
    /// (name, path) of smoke/misuse/backends linked statically and dynamically.
    programs: Vec<(String, PathBuf)>,
}

fn compile(dir: &Path, src: &str, link: &str, lib: &Path) -> PathBuf {
    let exe = dir.join(format!("{src}_{link}"));
    let mut cmd = Command::new("cc");
    cmd.args(CFLAGS)
        .arg(format!(
            "-DHP_TEST_CUDA_BUILD={}",
            u8::from(cfg!(feature = "cuda"))
        ))
        .arg("-g")
        .arg("-I")
        .arg(root().join("include"))
        .arg("-I")
        .arg(root().join("ffi/tests"))
        .arg(root().join(format!("ffi/tests/{src}.c")))
        .arg("-o")
        .arg(&exe);
    if link == "static" {
        cmd.arg(lib.join("libhiprune.a"));
        if cfg!(feature = "cuda") {
            // The CUDA runtime and the C++ runtime the kernels' launchers need are
            // linked by name, not bundled into the archive (what rustc's
            // `--print native-static-libs` lists).
            if let Some(home) = std::env::var_os("CUDA_HOME") {
                for dir in ["lib", "lib64"] {
                    cmd.arg(format!("-L{}/{dir}", Path::new(&home).display()));
                }
            }
            cmd.args(["-lcudart_static", "-lstdc++"]);
        }
        cmd.args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ]);
    } else {
        cmd.arg("-L")
            .arg(lib)
            .arg("-lhiprune")
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .arg("-lm");
    }
    run_ok(&mut cmd);
    exe
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ffi_c");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let package = dir.join("sd35.hpk");
        build_package(&package);
        let corrupt = dir.join("sd35-truncated.hpk");
        let bytes = std::fs::read(&package).unwrap();
        std::fs::write(&corrupt, &bytes[..bytes.len() * 2 / 3]).unwrap();

        let inputs = TensorFile::open(fixture("inputs.safetensors")).unwrap();
        let hs = inputs.get("hidden_states").unwrap();
        let ehs = inputs.get("encoder_hidden_states").unwrap();
        std::fs::write(
            dir.join("fwd_dims.txt"),
            format!(
                "{} {} {} {}",
                hs.shape[0], hs.shape[2], hs.shape[3], ehs.shape[1]
            ),
        )
        .unwrap();
        for (file, name) in [
            ("fwd_latent.bin", "hidden_states"),
            ("fwd_context.bin", "encoder_hidden_states"),
            ("fwd_pooled.bin", "pooled_projections"),
            ("fwd_timestep.bin", "timestep"),
        ] {
            write_f32(&dir, file, inputs.get(name).unwrap());
        }
        let si = TensorFile::open(fixture("sample_inputs.safetensors")).unwrap();
        let lat = si.get("latent_init").unwrap();
        let sctx = si.get("encoder_hidden_states").unwrap();
        std::fs::write(
            dir.join("smp_dims.txt"),
            format!(
                "{} {} {} {}",
                lat.shape[0], lat.shape[2], lat.shape[3], sctx.shape[1]
            ),
        )
        .unwrap();
        for (file, name) in [
            ("smp_latent.bin", "latent_init"),
            ("smp_context.bin", "encoder_hidden_states"),
            ("smp_pooled.bin", "pooled_projections"),
            ("smp_neg_context.bin", "negative_encoder_hidden_states"),
            ("smp_neg_pooled.bin", "negative_pooled_projections"),
        ] {
            write_f32(&dir, file, si.get(name).unwrap());
        }

        let lib = lib_dir();
        let mut programs = Vec::new();
        for src in ["smoke", "misuse", "backends"] {
            for link in ["static", "shared"] {
                programs.push((format!("{src}_{link}"), compile(&dir, src, link, &lib)));
            }
        }
        Setup {
            dir,
            package,
            corrupt,
            programs,
        }
    })
}

/// A command that runs a C test program on the library its rpath names: cargo puts
/// `target/<profile>` on `LD_LIBRARY_PATH`, whose `libhiprune.so` may come from
/// another build (say `cargo build` without the features of this test run).
fn c_program(exe: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd
}

fn program(name: &str) -> &'static Path {
    &setup()
        .programs
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no program {name}"))
        .1
}

/// Arguments of a program, by its source name.
fn args(s: &Setup, name: &str, out_dir: &Path) -> Vec<PathBuf> {
    if name.starts_with("smoke") || name.starts_with("backends") {
        vec![s.package.clone(), out_dir.to_path_buf()]
    } else {
        vec![
            s.package.clone(),
            s.corrupt.clone(),
            s.dir.join("no-such-model.hpk"),
        ]
    }
}

/// Copies the inputs into a fresh folder for one run (runs may go in parallel).
fn run_dir(s: &Setup, name: &str) -> PathBuf {
    let d = s.dir.join(format!("run-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(&s.dir).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        if n.starts_with("fwd_") || n.starts_with("smp_") {
            std::fs::copy(&p, d.join(&n)).unwrap();
        }
    }
    d
}

/// max|a - b| / max|b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let max_ref = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max_err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(max_ref > 0.0);
    max_err / max_ref
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn header_compiles_as_c99_and_cxx17() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ffi_header");
    std::fs::create_dir_all(&dir).unwrap();
    let src = "#include \"hiprune.h\"\nint main(void) { hp_context_params p = hp_context_default_params(); return (int)p.backend; }\n";
    std::fs::write(dir.join("h.c"), src).unwrap();
    std::fs::write(dir.join("h.cpp"), src.replace("(void)", "()")).unwrap();
    run_ok(
        Command::new("cc")
            .args(CFLAGS)
            .arg("-fsyntax-only")
            .arg("-I")
            .arg(root().join("include"))
            .arg(dir.join("h.c")),
    );
    run_ok(
        Command::new("c++")
            .args([
                "-std=c++17",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wpedantic",
                "-fsyntax-only",
            ])
            .arg("-I")
            .arg(root().join("include"))
            .arg(dir.join("h.cpp")),
    );
}

#[test]
fn smoke_static_and_shared_match_rust_and_diffusers() {
    let s = setup();
    // The Rust API on the same package and inputs.
    let model = Mmdit::load(&s.package).unwrap();
    let inputs = TensorFile::open(fixture("inputs.safetensors")).unwrap();
    let want_fwd = model
        .forward(&MmditInputs {
            hidden_states: inputs.get("hidden_states").unwrap(),
            encoder_hidden_states: inputs.get("encoder_hidden_states").unwrap(),
            pooled_projections: inputs.get("pooled_projections").unwrap(),
            timestep: inputs.get("timestep").unwrap(),
        })
        .unwrap();
    let si = TensorFile::open(fixture("sample_inputs.safetensors")).unwrap();
    let cond = Conditioning {
        encoder_hidden_states: si.get("encoder_hidden_states").unwrap(),
        pooled_projections: si.get("pooled_projections").unwrap(),
        negative_encoder_hidden_states: Some(si.get("negative_encoder_hidden_states").unwrap()),
        negative_pooled_projections: Some(si.get("negative_pooled_projections").unwrap()),
    };
    let mut opts = SampleOptions {
        steps: 4,
        shift: 3.0,
        guidance: None,
    };
    let lat = si.get("latent_init").unwrap().clone();
    let want_smp = sample(&model, lat.clone(), &cond, &opts, |_, _, _| {}).unwrap();
    opts.guidance = Some(4.5);
    let want_cfg = sample(&model, lat, &cond, &opts, |_, _, _| {}).unwrap();
    let outs = TensorFile::open(fixture("outputs.safetensors")).unwrap();
    let souts = TensorFile::open(fixture("sample_outputs.safetensors")).unwrap();

    for link in ["static", "shared"] {
        let name = format!("smoke_{link}");
        let d = run_dir(s, &name);
        let log = run_ok(c_program(program(&name)).args(args(s, &name, &d)));
        eprintln!("{name}:\n{log}");
        assert!(log.contains("component cuts: 0"), "{log}");
        assert!(log.contains("smoke passed"), "{log}");
        for (file, want, fixture_t) in [
            ("fwd_out.bin", &want_fwd, outs.get("output").unwrap()),
            ("smp_out.bin", &want_smp, souts.get("latent_final").unwrap()),
            (
                "smp_cfg_out.bin",
                &want_cfg,
                souts.get("latent_final_cfg").unwrap(),
            ),
        ] {
            let got = read_f32(&d, file);
            let vs_rust = max_abs_diff(&got, &want.data);
            let vs_fixture = rel_err(&got, &fixture_t.data);
            eprintln!(
                "{name} {file}: max|C - Rust| = {vs_rust:.3e}, max|C - diffusers|/max|diffusers| = {vs_fixture:.3e}"
            );
            assert!(vs_rust <= 1e-6, "{name} {file}: {vs_rust}");
            assert!(vs_fixture <= 1e-4, "{name} {file}: {vs_fixture}");
        }
    }
}

#[test]
fn misuse_returns_documented_codes() {
    let s = setup();
    for link in ["static", "shared"] {
        let name = format!("misuse_{link}");
        let d = run_dir(s, &name);
        let log = run_ok(c_program(program(&name)).args(args(s, &name, &d)));
        assert!(log.contains("misuse passed"), "{log}");
        assert!(!log.contains("FAIL"), "{log}");
        let checks = log.lines().filter(|l| l.starts_with("ok ")).count();
        eprintln!("{name}: {checks} checks passed");
        assert!(checks >= 60, "only {checks} checks ran:\n{log}");
    }
}

/// `HP_BACKEND_CUDA` and `HP_BACKEND_AUTO` do what the header says: without a GPU,
/// CUDA is refused as "not built with CUDA" or "no usable CUDA device" (as the build
/// has it) and AUTO falls back to the CPU, says so and computes the CPU's bits; with a
/// GPU, both run on CUDA within its tolerance of the CPU.
#[test]
fn backend_choice_is_reported_and_honoured() {
    let s = setup();
    for link in ["static", "shared"] {
        let name = format!("backends_{link}");
        let d = run_dir(s, &name);
        let log = run_ok(c_program(program(&name)).args(args(s, &name, &d)));
        assert!(log.contains("backends passed"), "{log}");
        assert!(!log.contains("FAIL"), "{log}");
        let expected = if cfg!(feature = "cuda") {
            "no usable CUDA device"
        } else {
            "not built with CUDA"
        };
        assert!(
            log.contains("CUDA context created") || log.contains(expected),
            "{log}"
        );
        eprintln!("{name}:\n{log}");
    }
}

#[test]
fn valgrind_finds_no_errors_or_definite_leaks() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("HIPRUNE_REQUIRE_VALGRIND").is_none(),
            "HIPRUNE_REQUIRE_VALGRIND is set but valgrind is not installed"
        );
        eprintln!("SKIP: valgrind is not installed (apt-get install valgrind; .ci/run does)");
        return;
    }
    let s = setup();
    for (name, exe) in &s.programs {
        let d = run_dir(s, &format!("vg-{name}"));
        let log = run_ok(
            c_program("valgrind")
                .args([
                    "--error-exitcode=1",
                    "--leak-check=full",
                    "--errors-for-leak-kinds=definite",
                    "--quiet",
                ])
                .arg(exe)
                .args(args(s, name, &d)),
        );
        assert!(
            ["smoke passed", "misuse passed", "backends passed"]
                .iter()
                .any(|m| log.contains(m)),
            "{log}"
        );
        eprintln!("valgrind {name}: clean");
    }
}

/// Function names declared in the committed bindgen output of the header.
fn header_functions() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("ffi/bindings.rs")).unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("pub fn "))
        .map(|l| l.split('(').next().unwrap().to_string())
        .collect()
}

#[test]
fn shared_library_exports_exactly_the_header_functions() {
    let lib = lib_dir().join("libhiprune.so");
    let out = run_ok(Command::new("nm").args(["-D", "--defined-only"]).arg(&lib));
    let exported: BTreeSet<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(|s| s.split('@').next().unwrap().to_string())
        .collect();
    let declared = header_functions();
    assert!(declared.len() >= 16, "{declared:?}");
    assert_eq!(
        exported, declared,
        "the shared library must export exactly the header's functions"
    );
}

#[test]
fn component_cuts_of_a_package_are_listed_in_c() {
    let s = setup();
    let package = s.dir.join("sd35-cuts.hpk");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_hiprune"))
            .arg("compress")
            .arg(fixture(""))
            .arg("-o")
            .arg(&package)
            .args([
                "--weights",
                "f32",
                "--remove",
                "2.ff_context,3.attn,2.norm1",
            ]),
    );
    let d = run_dir(s, "cuts");
    let log = run_ok(c_program(program("smoke_shared")).arg(&package).arg(&d));
    for line in [
        "component cut: 2.norm1",
        "component cut: 3.attn",
        "component cut: 2.ff_context",
        "component cuts: 3",
        "smoke passed",
    ] {
        assert!(log.contains(line), "{line} missing:\n{log}");
    }
}
