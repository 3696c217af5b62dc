//! `hiprune compress --weights int4` (symmetric, scale only) and `--weights int4-asym`
//! (scale and offset) on a generated checkpoint: both packages load and run, and
//! `hiprune inspect` shows their precisions and the computed positional table.

use std::process::Command;

use hiprune::compress::generate::{GenerateOptions, Preset, generate_checkpoint};
use hiprune::model::{Mmdit, MmditInputs, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hiprune"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hiprune {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn random(rng: &mut StdRng, shape: Vec<usize>) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor {
        data: (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
        shape,
    }
}

#[test]
fn int4_and_int4_asym_packages_load_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("ckpt");
    let mut cfg = Preset::Tiny.config();
    cfg.num_layers = 2;
    generate_checkpoint(
        &src,
        &GenerateOptions {
            f16: true,
            seed: 3,
            ..GenerateOptions::new(cfg.clone())
        },
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(0xc11);
    let hs = random(&mut rng, vec![1, cfg.in_channels, 6, 4]);
    let ehs = random(&mut rng, vec![1, 3, cfg.joint_attention_dim]);
    let pooled = random(&mut rng, vec![1, cfg.pooled_projection_dim]);
    let t = Tensor {
        data: vec![500.0],
        shape: vec![1],
    };
    let inputs = MmditInputs {
        hidden_states: &hs,
        encoder_hidden_states: &ehs,
        pooled_projections: &pooled,
        timestep: &t,
    };
    let dense = Mmdit::load(&src).unwrap().forward(&inputs).unwrap();

    let mut sizes = Vec::new();
    for (weights, precision) in [("int4", "int4sym/g32"), ("int4-asym", "int4/g32")] {
        let out = dir.path().join(format!("{weights}.hpk"));
        let out_s = out.to_str().unwrap();
        run(&[
            "compress",
            src.to_str().unwrap(),
            "-o",
            out_s,
            "--weights",
            weights,
            "--group",
            "32",
        ]);
        let json: serde_json::Value =
            serde_json::from_str(&run(&["inspect", out_s, "--json", "--verify"])).unwrap();
        let layers = json["layers"].as_array().unwrap();
        let q4 = layers
            .iter()
            .filter(|l| l["precision"] == precision)
            .count();
        assert!(q4 > 0, "{weights}: no {precision} layer in {layers:?}");
        let table = layers
            .iter()
            .find(|l| l["name"] == "pos_embed.pos_embed")
            .expect("the positional table is listed as computed");
        assert!(
            table["precision"].as_str().unwrap().contains("computed"),
            "{table}"
        );
        assert_eq!(table["bytes"], 0);
        let y = Mmdit::load(&out).unwrap().forward(&inputs).unwrap();
        let num: f64 = y
            .data
            .iter()
            .zip(&dense.data)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let den: f64 = dense.data.iter().map(|a| f64::from(*a).powi(2)).sum();
        let err = (num / den).sqrt();
        assert!(err > 0.0 && err < 0.35, "{weights}: relative error {err}");
        sizes.push(std::fs::metadata(&out).unwrap().len());
    }
    assert!(
        sizes[0] < sizes[1],
        "symmetric {} vs asymmetric {}",
        sizes[0],
        sizes[1]
    );
    // An unknown value is refused by the argument parser.
    let bad = Command::new(env!("CARGO_BIN_EXE_hiprune"))
        .args([
            "compress",
            src.to_str().unwrap(),
            "-o",
            "x.hpk",
            "--weights",
            "int3",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
