//! Crash safety of the package writer: `hiprune compress` is killed (SIGKILL) at random
//! moments; the output path must then hold nothing or a complete, valid package, and any
//! file left behind must be a clearly named temporary (`.<output name>.tmp-*` or
//! `.<output name>.spool*`) that a later run or a user can delete.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hiprune::Package;
use hiprune::compress::generate::{GenerateOptions, Preset, generate_checkpoint};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEEDS: u64 = 20;

fn compress_command(src: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hiprune"));
    cmd.arg("compress")
        .arg(src)
        .arg("-o")
        .arg(out)
        .args(["--weights", "int4", "--group", "64"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    cmd
}

/// Every file in `dir` other than the checkpoint folder and a valid output must be a
/// named temporary of the output.
fn check_leftovers(dir: &Path, out_name: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name == "ckpt" || name == out_name {
            continue;
        }
        let tmp = format!(".{out_name}.tmp-");
        let spool = format!(".{out_name}.spool");
        assert!(
            name.starts_with(&tmp) || name.starts_with(&spool),
            "unexpected file `{name}` left behind"
        );
    }
}

#[test]
fn killing_compress_never_leaves_a_partial_package() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("ckpt");
    let mut config = Preset::Tiny.config();
    config.num_attention_heads = 8; // D = 256: big enough that a run takes a while
    config.caption_projection_dim = 256;
    config.num_layers = 6;
    let mut opts = GenerateOptions::new(config);
    opts.seed = 3;
    generate_checkpoint(&src, &opts).unwrap();

    // One uninterrupted run gives the time window to kill in.
    let out_name = "model.hpk";
    let out = dir.path().join(out_name);
    let start = Instant::now();
    assert!(compress_command(&src, &out).status().unwrap().success());
    let full = start.elapsed();
    Package::open(&out).unwrap().verify().unwrap();
    std::fs::remove_file(&out).unwrap();

    let mut complete = 0;
    for seed in 0..SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        let delay = full.mul_f64(rng.random_range(0.0..1.1));
        let mut child = compress_command(&src, &out).spawn().unwrap();
        std::thread::sleep(delay.min(Duration::from_secs(30)));
        let _ = child.kill(); // SIGKILL: no destructor or cleanup runs
        child.wait().unwrap();
        if out.exists() {
            let package =
                Package::open(&out).unwrap_or_else(|e| panic!("seed {seed}: partial package: {e}"));
            package
                .verify()
                .unwrap_or_else(|e| panic!("seed {seed}: corrupt package: {e}"));
            complete += 1;
            std::fs::remove_file(&out).unwrap();
        }
        check_leftovers(dir.path(), out_name);
    }
    println!("{complete} of {SEEDS} killed runs had finished; the rest left no package");
}
