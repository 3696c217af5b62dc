//! The 2D sin-cos positional table against the tables diffusers wrote into the MMDiT
//! fixtures, bit for bit.

use std::path::{Path, PathBuf};

use hiprune::format::Dtype;
use hiprune::model::pos_embed::{round_through, sincos_2d_f32, sincos_2d_table};
use hiprune::model::{MmditConfig, Weights};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mmdit")
        .join(name)
}

/// The stored table of a fixture and the parameters diffusers computed it from.
fn stored_table(name: &str) -> (Vec<f32>, usize, usize, usize) {
    let dir = fixture(name);
    let cfg = MmditConfig::from_file(dir.join("config.json")).unwrap();
    let w = Weights::from_folder(&dir).unwrap();
    let m = cfg.pos_embed_max_size;
    let d = cfg.hidden_size();
    let t = w.f32_tensor("pos_embed.pos_embed", &[1, m * m, d]).unwrap();
    (t, m, cfg.sample_size / cfg.patch_size, d)
}

fn mismatches(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

#[test]
fn sincos_matches_diffusers_f32_fixtures() {
    for name in ["sd3", "sd35", "mmditx", "sd35_sharded"] {
        let (stored, m, base, d) = stored_table(name);
        let ours = sincos_2d_f32(m, base, d).unwrap();
        assert_eq!(mismatches(&ours, &stored), 0, "{name}");
        // The table is not trivially constant: both halves vary across the grid.
        assert!(ours.iter().any(|&v| v < -0.5) && ours.iter().any(|&v| v > 0.5));
    }
}

#[test]
fn sincos_matches_diffusers_f16_fixture() {
    let (stored, m, base, d) = stored_table("sd3_f16");
    let ours = sincos_2d_table(m, base, d, &[Dtype::F16]).unwrap();
    assert_eq!(mismatches(&ours, &stored), 0);
    // Without the f16 rounding the values differ.
    let f32_only = sincos_2d_f32(m, base, d).unwrap();
    assert!(mismatches(&f32_only, &stored) > 0);
}

/// Layout facts: row `r * grid + c` is `[sin(x_c w) | cos(x_c w) | sin(y_r w) | cos(y_r
/// w)]` with `x_c = c * base / grid`; checked against an independent f64 formula on
/// awkward sizes.
#[test]
fn sincos_layout_independent_formula() {
    for &(grid, base, dim) in &[(5usize, 2usize, 8usize), (7, 7, 12), (3, 9, 4), (12, 4, 16)] {
        let t = sincos_2d_f32(grid, base, dim).unwrap();
        let q = dim / 4;
        for r in 0..grid {
            for c in 0..grid {
                for j in 0..q {
                    let om = 1.0 / 10000f64.powf(j as f64 / q as f64);
                    let x = f64::from(c as f32 / (grid as f32 / base as f32));
                    let y = f64::from(r as f32 / (grid as f32 / base as f32));
                    let row = &t[(r * grid + c) * dim..][..dim];
                    let want = [
                        (x * om).sin(),
                        (x * om).cos(),
                        (y * om).sin(),
                        (y * om).cos(),
                    ];
                    for (h, w) in want.iter().enumerate() {
                        let got = f64::from(row[h * q + j]);
                        assert!((got - w).abs() <= 1e-6, "{grid} {base} {dim} ({r},{c},{j})");
                    }
                }
            }
        }
    }
}

#[test]
fn sincos_rejects_bad_sizes() {
    assert!(sincos_2d_f32(0, 1, 8).is_err());
    assert!(sincos_2d_f32(4, 0, 8).is_err());
    assert!(sincos_2d_f32(4, 2, 6).is_err());
    assert!(sincos_2d_f32(4, 2, 0).is_err());
    assert!(sincos_2d_f32(usize::MAX, 2, 8).is_err());
    let mut v = vec![0.1f32; 4];
    assert!(round_through(&mut v, Dtype::U8).is_err());
    round_through(&mut v, Dtype::Bf16).unwrap();
    assert_eq!(v[0], half::bf16::from_f32(0.1).to_f32());
}
