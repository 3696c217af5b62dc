//! NF4 round-to-nearest quantiser: layout, nearest-level choice, odd shapes, errors.

use half::f16;
use hiprune::Error;
use hiprune::quant::nf4::{NF4_MIDPOINTS, nf4_code};
use hiprune::quant::reference::dequantize;
use hiprune::quant::{NF4_CODEBOOK, Q4Kind, Q4Matrix, quantize_nf4, quantize_nf4_row};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCKS: [usize; 3] = [32, 64, 128];

fn deq(m: &Q4Matrix) -> Vec<f64> {
    dequantize(&m.view().expect("quantiser output must be a valid matrix"))
}

fn code_at(m: &Q4Matrix, r: usize, c: usize) -> u8 {
    let byte = m.packed[r * m.k / 2 + c / 2];
    if c.is_multiple_of(2) {
        byte & 0x0f
    } else {
        byte >> 4
    }
}

fn sample(rng: &mut StdRng, len: usize, heavy: bool) -> Vec<f32> {
    let scale = rng.random_range(0.001f32..3.0);
    (0..len)
        .map(|_| {
            let v = rng.random_range(-1.0f32..1.0);
            if heavy && rng.random_range(0..50) == 0 {
                v * scale * 20.0
            } else {
                v * scale
            }
        })
        .collect()
}

/// A hand-made block: each NF4 level times 2 comes back exactly, low nibble first.
#[test]
fn nf4_pack_layout_known_example() {
    // Levels 0..15 then 15..0, times absmax 2 (an f16).
    let mut w: Vec<f32> = NF4_CODEBOOK.iter().map(|v| 2.0 * v).collect();
    w.extend(NF4_CODEBOOK.iter().rev().map(|v| 2.0 * v));
    let m = quantize_nf4(&w, 1, 32, 32).unwrap();
    assert_eq!(m.kind, Q4Kind::Nf4);
    assert_eq!((m.n, m.k, m.group), (1, 32, 32));
    assert_eq!(m.scales, vec![f16::from_f32(2.0)]);
    assert!(m.offsets.is_empty());
    assert_eq!(m.packed[0], 0x10);
    assert_eq!(m.packed[7], 0xfe);
    assert_eq!(m.packed[8], 0xef);
    assert_eq!(m.packed[15], 0x01);
    for (a, b) in w.iter().zip(deq(&m)) {
        assert_eq!(f64::from(*a), b);
    }
}

/// The midpoints lie between neighbouring levels and `nf4_code` maps each level to
/// itself and each midpoint to the lower level.
#[test]
fn nf4_code_levels_and_midpoints() {
    for (i, &l) in NF4_CODEBOOK.iter().enumerate() {
        assert_eq!(nf4_code(l) as usize, i);
    }
    for (i, &m) in NF4_MIDPOINTS.iter().enumerate() {
        assert!(NF4_CODEBOOK[i] < m && m < NF4_CODEBOOK[i + 1]);
        assert_eq!(nf4_code(m) as usize, i);
        assert_eq!(nf4_code(m + 1e-6) as usize, i + 1);
    }
    assert_eq!(nf4_code(-5.0), 0);
    assert_eq!(nf4_code(5.0), 15);
}

/// Every weight gets the level nearest to it, with the stored (f16) absmax.
#[test]
fn nf4_picks_nearest_level() {
    let mut rng = StdRng::seed_from_u64(5);
    for &b in &BLOCKS {
        for heavy in [false, true] {
            let (n, k) = (rng.random_range(1..6usize), b * rng.random_range(1..4usize));
            let w = sample(&mut rng, n * k, heavy);
            let m = quantize_nf4(&w, n, k, b).unwrap();
            for r in 0..n {
                for c in 0..k {
                    let a = f64::from(m.scales[r * (k / b) + c / b].to_f32());
                    let x = f64::from(w[r * k + c]);
                    let q = code_at(&m, r, c) as usize;
                    let chosen = (x - a * f64::from(NF4_CODEBOOK[q])).abs();
                    for (j, &l) in NF4_CODEBOOK.iter().enumerate() {
                        let other = (x - a * f64::from(l)).abs();
                        assert!(
                            chosen <= other + a * 1e-6,
                            "B={b} ({r},{c}): code {q} at {chosen}, code {j} at {other}"
                        );
                    }
                }
            }
            // absmax is the f16-rounded block absmax.
            for (bi, s) in m.scales.iter().enumerate() {
                let blk = &w[bi * b..(bi + 1) * b];
                let amax = blk.iter().fold(0f32, |x, v| x.max(v.abs()));
                assert_eq!(*s, f16::from_f32(amax));
            }
        }
    }
}

/// The row-level function writes exactly what the matrix function writes.
#[test]
fn nf4_row_function_matches_matrix() {
    let mut rng = StdRng::seed_from_u64(6);
    for &b in &BLOCKS {
        let (n, k) = (4, 2 * b);
        let w = sample(&mut rng, n * k, true);
        let m = quantize_nf4(&w, n, k, b).unwrap();
        for r in 0..n {
            let mut p = vec![0u8; k / 2];
            let mut s = vec![f16::ZERO; k / b];
            quantize_nf4_row(&w[r * k..(r + 1) * k], b, &mut p, &mut s).unwrap();
            assert_eq!(p, m.packed[r * k / 2..(r + 1) * k / 2]);
            assert_eq!(s, m.scales[r * k / b..(r + 1) * k / b]);
        }
    }
}

/// Odd shapes and all block sizes, including a large matrix (parallel path).
#[test]
fn nf4_odd_shapes() {
    let mut rng = StdRng::seed_from_u64(8);
    for &b in &BLOCKS {
        for &n in &[1usize, 3, 130] {
            for &blocks in &[1usize, 5] {
                let k = b * blocks;
                let w = sample(&mut rng, n * k, false);
                let m = quantize_nf4(&w, n, k, b).unwrap();
                assert_eq!(m.packed.len(), n * k / 2);
                assert_eq!(m.scales.len(), n * blocks);
                let d = deq(&m);
                for (i, (x, y)) in w.iter().zip(&d).enumerate() {
                    // The widest NF4 gap is -1 to -0.696: half of it times absmax.
                    let a = f64::from(m.scales[i / b].to_f32());
                    assert!((f64::from(*x) - y).abs() <= a * 0.153 + 1e-6);
                }
            }
        }
    }
}

/// Zero and constant rows.
#[test]
fn nf4_constant_rows() {
    let m = quantize_nf4(&[0.0f32; 64], 1, 64, 32).unwrap();
    assert!(m.scales.iter().all(|s| s.to_f32() == 0.0));
    assert!(deq(&m).iter().all(|x| *x == 0.0));
    assert!(
        m.packed.iter().all(|&b| b == 0x77),
        "zero codes are level 0.0"
    );
    for v in [1.5f32, -0.3, 1000.1] {
        let m = quantize_nf4(&[v; 128], 1, 128, 64).unwrap();
        let v16 = f64::from(f16::from_f32(v.abs()).to_f32()) * f64::from(v.signum());
        assert!(deq(&m).iter().all(|x| *x == v16), "{v}");
    }
}

#[test]
fn nf4_error_cases() {
    let w = vec![0.0f32; 96];
    assert!(matches!(
        quantize_nf4(&w, 1, 96, 64),
        Err(Error::GroupDoesNotDivide {
            k: 96,
            group: 64,
            ..
        })
    ));
    for b in [0usize, 16, 256] {
        assert!(matches!(
            quantize_nf4(&w, 1, 96, b),
            Err(Error::InvalidGroupSize { .. })
        ));
    }
    assert!(matches!(
        quantize_nf4(&w, 2, 64, 32),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        quantize_nf4(&[], 0, 64, 32),
        Err(Error::InvalidArgument { .. })
    ));
    for bad in [f32::NAN, f32::INFINITY] {
        let mut w = vec![0.5f32; 2 * 64];
        w[64 + 11] = bad;
        match quantize_nf4(&w, 2, 64, 64) {
            Err(Error::InvalidArgument { what, reason }) => {
                assert_eq!(what, "weights");
                assert!(
                    reason.contains("row 1") && reason.contains("column 11"),
                    "{reason}"
                );
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }
    // absmax beyond f16.
    let mut w = vec![0.0f32; 64];
    w[0] = 1.0e6;
    assert!(matches!(
        quantize_nf4(&w, 1, 64, 64),
        Err(Error::InvalidArgument { .. })
    ));
    let (mut p, mut s) = (vec![0u8; 32], vec![f16::ZERO; 2]);
    assert!(quantize_nf4_row(&[0.0; 64], 32, &mut p[..30], &mut s).is_err());
    assert!(quantize_nf4_row(&[0.0; 64], 32, &mut p, &mut s[..1]).is_err());
    assert!(quantize_nf4_row(&[0.0; 64], 32, &mut p, &mut s).is_ok());
}
