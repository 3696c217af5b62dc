//! INT4 round-to-nearest quantiser: layout, error bounds, symmetric convention, clip
//! search, odd shapes and error cases.

use half::f16;
use hiprune::Error;
use hiprune::quant::reference::dequantize;
use hiprune::quant::{Int4Options, Q4Kind, Q4Matrix, quantize_int4, quantize_int4_row};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const GROUPS: [usize; 3] = [32, 64, 128];

fn opts(group: usize, symmetric: bool, clip_search: bool) -> Int4Options {
    Int4Options {
        group,
        symmetric,
        clip_search,
    }
}

/// Weight distributions the tests sweep.
#[derive(Clone, Copy, Debug)]
enum Dist {
    Uniform,
    Normal,
    /// Student-t-like heavy tails: normal divided by a small uniform.
    HeavyTailed,
    /// Normal with a few large outliers.
    Outliers,
    /// All positive, away from zero.
    Shifted,
}

fn normal(rng: &mut StdRng) -> f32 {
    // Box-Muller.
    let u1: f32 = rng.random_range(1e-7f32..1.0);
    let u2: f32 = rng.random_range(0.0f32..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn sample(rng: &mut StdRng, dist: Dist, len: usize) -> Vec<f32> {
    let scale = rng.random_range(0.01f32..2.0);
    (0..len)
        .map(|_| {
            scale
                * match dist {
                    Dist::Uniform => rng.random_range(-1.0f32..1.0),
                    Dist::Normal => normal(rng),
                    Dist::HeavyTailed => normal(rng) / rng.random_range(0.15f32..1.0),
                    Dist::Outliers => {
                        let v = normal(rng);
                        if rng.random_range(0..100) < 3 {
                            v * 12.0
                        } else {
                            v
                        }
                    }
                    Dist::Shifted => 3.0 + rng.random_range(0.0f32..1.0),
                }
        })
        .collect()
}

fn deq(m: &Q4Matrix) -> Vec<f64> {
    dequantize(&m.view().expect("quantiser output must be a valid matrix"))
}

fn sq_err(w: &[f32], d: &[f64]) -> f64 {
    w.iter()
        .zip(d)
        .map(|(&a, &b)| (f64::from(a) - b).powi(2))
        .sum()
}

/// A small hand-made example: the layout is low nibble = even k, and the f16
/// parameters are min and range / 15.
#[test]
fn int4_pack_layout_known_example() {
    // One group of 32: values 0..=15 then 15..=0 (scale 1, offset 0).
    let mut w: Vec<f32> = (0..16).map(|i| i as f32).collect();
    w.extend((0..16).rev().map(|i| i as f32));
    let m = quantize_int4(&w, 1, 32, &opts(32, false, false)).unwrap();
    assert_eq!(m.kind, Q4Kind::Int4);
    assert_eq!((m.n, m.k, m.group), (1, 32, 32));
    assert_eq!(m.scales, vec![f16::from_f32(1.0)]);
    assert_eq!(m.offsets, vec![f16::from_f32(0.0)]);
    assert_eq!(m.packed.len(), 16);
    // Byte j: low nibble k = 2j, high nibble k = 2j + 1.
    assert_eq!(m.packed[0], 0x10);
    assert_eq!(m.packed[1], 0x32);
    assert_eq!(m.packed[7], 0xfe);
    assert_eq!(m.packed[8], 0xef);
    assert_eq!(m.packed[15], 0x01);
    let d = deq(&m);
    for (a, b) in w.iter().zip(&d) {
        assert_eq!(f64::from(*a), *b);
    }
}

/// The row-level function writes exactly what the matrix function writes.
#[test]
fn int4_row_function_matches_matrix() {
    let mut rng = StdRng::seed_from_u64(11);
    for &g in &GROUPS {
        for &(sym, clip) in &[(false, false), (true, false), (false, true), (true, true)] {
            let (n, k) = (5, 3 * g);
            let w = sample(&mut rng, Dist::Outliers, n * k);
            let o = opts(g, sym, clip);
            let m = quantize_int4(&w, n, k, &o).unwrap();
            for r in 0..n {
                let mut p = vec![0u8; k / 2];
                let mut s = vec![f16::ZERO; k / g];
                // Symmetric groups store no offsets.
                let mut off = vec![f16::ZERO; if sym { 0 } else { k / g }];
                quantize_int4_row(&w[r * k..(r + 1) * k], &o, &mut p, &mut s, &mut off).unwrap();
                assert_eq!(p, m.packed[r * k / 2..(r + 1) * k / 2]);
                assert_eq!(s, m.scales[r * k / g..(r + 1) * k / g]);
                let ostride = off.len();
                assert_eq!(off, m.offsets[r * ostride..(r + 1) * ostride]);
            }
        }
    }
}

/// Asymmetric RTN: every element within half a step of its dequantised value (plus the
/// f16 rounding of the parameters), and the offset is the f16 group minimum.
#[test]
fn int4_asymmetric_error_bound() {
    let mut rng = StdRng::seed_from_u64(1);
    let dists = [
        Dist::Uniform,
        Dist::Normal,
        Dist::HeavyTailed,
        Dist::Outliers,
        Dist::Shifted,
    ];
    for &g in &GROUPS {
        for &dist in &dists {
            let n = rng.random_range(1..7usize);
            let k = g * rng.random_range(1..5usize);
            let w = sample(&mut rng, dist, n * k);
            let m = quantize_int4(&w, n, k, &opts(g, false, false)).unwrap();
            let d = deq(&m);
            for r in 0..n {
                for c in 0..k {
                    let gi = r * (k / g) + c / g;
                    let s = f64::from(m.scales[gi].to_f32());
                    let o = f64::from(m.offsets[gi].to_f32());
                    let grp = &w[r * k + c / g * g..r * k + (c / g + 1) * g];
                    let lo = grp.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = grp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    assert_eq!(m.offsets[gi], f16::from_f32(lo));
                    // f16 slack: offset rounding plus 15 times the scale rounding.
                    let amax = f64::from(lo.abs().max(hi.abs()));
                    let slack = amax * 2f64.powi(-11) + 15.0 * s * 2f64.powi(-11) + 1e-7;
                    let e = (f64::from(w[r * k + c]) - d[r * k + c]).abs();
                    assert!(
                        e <= s / 2.0 + slack,
                        "{dist:?} G={g} ({r},{c}): |w - dq| = {e} > {s}/2 + {slack} (o={o})"
                    );
                }
            }
        }
    }
}

/// Symmetric: an `Int4Sym` matrix without offsets whose values are `scale * (q - 8)`,
/// and the error is at most scale / 2 (the scale being at most absmax / 7.5) plus f16
/// slack.
#[test]
fn int4_symmetric_offset_and_bound() {
    let mut rng = StdRng::seed_from_u64(2);
    for &g in &GROUPS {
        for &dist in &[Dist::Normal, Dist::Uniform, Dist::Outliers, Dist::Shifted] {
            let (n, k) = (3, 2 * g);
            let w = sample(&mut rng, dist, n * k);
            let m = quantize_int4(&w, n, k, &opts(g, true, false)).unwrap();
            assert_eq!(m.kind, Q4Kind::Int4Sym);
            assert!(m.offsets.is_empty(), "symmetric INT4 stores no offsets");
            assert_eq!(m.scales.len(), n * k / g);
            let d = deq(&m);
            for r in 0..n {
                for c in 0..k {
                    let byte = m.packed[(r * k + c) / 2];
                    let q = if c % 2 == 0 { byte & 15 } else { byte >> 4 };
                    let s = f64::from(m.scales[r * (k / g) + c / g].to_f32());
                    assert_eq!(d[r * k + c], s * (f64::from(q) - 8.0));
                }
            }
            for r in 0..n {
                for c in 0..k {
                    let gi = r * (k / g) + c / g;
                    let s = f64::from(m.scales[gi].to_f32());
                    let grp = &w[r * k + c / g * g..r * k + (c / g + 1) * g];
                    let amax = grp.iter().fold(0f32, |a, v| a.max(v.abs()));
                    assert!(s <= f64::from(amax) / 7.5 * (1.0 + 2f64.powi(-10)) + 1e-7);
                    let slack = 16.0 * s * 2f64.powi(-11) + 1e-7;
                    let e = (f64::from(w[r * k + c]) - d[r * k + c]).abs();
                    assert!(e <= s / 2.0 + slack, "{dist:?} G={g}: {e} > {s}/2");
                }
            }
        }
    }
}

/// A symmetric group whose extreme is negative uses the extra negative level.
#[test]
fn int4_symmetric_uses_negative_level() {
    let mut w = vec![0.0f32; 32];
    w[0] = -8.5;
    w[1] = 7.0;
    let m = quantize_int4(&w, 1, 32, &opts(32, true, false)).unwrap();
    assert_eq!(m.scales[0].to_f32(), 1.0);
    assert!(m.offsets.is_empty());
    // -8.5 takes code 0, i.e. the level -8.
    let d = deq(&m);
    assert_eq!(d[1], 7.0);
    assert_eq!(d[2], 0.0);
    assert!((d[0] + 8.0).abs() < 1e-9);
}

/// Clip search never does worse than plain RTN (per matrix, and per group), over several
/// seeds and distributions, and does strictly better on heavy-tailed data.
#[test]
fn int4_clip_search_never_worse_and_helps_outliers() {
    let dists = [
        Dist::Uniform,
        Dist::Normal,
        Dist::HeavyTailed,
        Dist::Outliers,
        Dist::Shifted,
    ];
    let mut strictly_better = 0;
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(100 + seed);
        for &g in &GROUPS {
            for &dist in &dists {
                for &sym in &[false, true] {
                    let (n, k) = (rng.random_range(1..6usize), g * rng.random_range(1..4usize));
                    let w = sample(&mut rng, dist, n * k);
                    let plain = quantize_int4(&w, n, k, &opts(g, sym, false)).unwrap();
                    let clip = quantize_int4(&w, n, k, &opts(g, sym, true)).unwrap();
                    let (dp, dc) = (deq(&plain), deq(&clip));
                    for gs in (0..n * k).step_by(g) {
                        let ep = sq_err(&w[gs..gs + g], &dp[gs..gs + g]);
                        let ec = sq_err(&w[gs..gs + g], &dc[gs..gs + g]);
                        assert!(
                            ec <= ep * (1.0 + 1e-9) + 1e-18,
                            "seed {seed} {dist:?} G={g} sym={sym}: group error {ec} > RTN {ep}"
                        );
                    }
                    let (ep, ec) = (sq_err(&w, &dp), sq_err(&w, &dc));
                    if matches!(dist, Dist::HeavyTailed | Dist::Outliers) && ec < ep * 0.99 {
                        strictly_better += 1;
                    }
                }
            }
        }
    }
    assert!(
        strictly_better > 0,
        "clip search never improved on heavy-tailed data"
    );
}

/// One heavy-tailed case where the gain must be substantial.
#[test]
fn int4_clip_search_strictly_better_on_outlier_group() {
    // 62 small values, a moderate tail on one side: clipping the tail pays off.
    let mut rng = StdRng::seed_from_u64(7);
    let mut w: Vec<f32> = (0..64).map(|_| 0.1 * normal(&mut rng)).collect();
    w[5] = 1.0;
    w[40] = 0.9;
    for sym in [false, true] {
        let plain = quantize_int4(&w, 1, 64, &opts(64, sym, false)).unwrap();
        let clip = quantize_int4(&w, 1, 64, &opts(64, sym, true)).unwrap();
        let (ep, ec) = (sq_err(&w, &deq(&plain)), sq_err(&w, &deq(&clip)));
        // Asymmetric may clip the two ends separately, so it gains much more here.
        let factor = if sym { 1.0 } else { 0.9 };
        assert!(
            ec < ep * factor,
            "sym={sym}: clip {ec} not below {factor} * RTN {ep}"
        );
    }
}

/// Odd shapes: N = 1, N = 3, K = one group, all group sizes.
#[test]
fn int4_odd_shapes() {
    let mut rng = StdRng::seed_from_u64(3);
    for &g in &GROUPS {
        for &n in &[1usize, 3, 17] {
            for &groups in &[1usize, 3] {
                let k = g * groups;
                let w = sample(&mut rng, Dist::Normal, n * k);
                let m = quantize_int4(&w, n, k, &opts(g, false, false)).unwrap();
                assert_eq!(m.packed.len(), n * k / 2);
                assert_eq!(m.scales.len(), n * groups);
                assert_eq!(m.offsets.len(), n * groups);
                let d = deq(&m);
                let max_s = m
                    .scales
                    .iter()
                    .map(|s| f64::from(s.to_f32()))
                    .fold(0.0, f64::max);
                for (a, b) in w.iter().zip(&d) {
                    assert!((f64::from(*a) - b).abs() <= max_s * 0.51 + 1e-6);
                }
            }
        }
    }
    // K = 32 with groups of 64 does not divide.
    let w = vec![0.5f32; 32];
    assert!(matches!(
        quantize_int4(&w, 1, 32, &opts(64, false, false)),
        Err(Error::GroupDoesNotDivide {
            k: 32,
            group: 64,
            ..
        })
    ));
}

/// Constant rows (including zeros and f16-inexact values) dequantise to the f16 value
/// with scale 0, in every mode.
#[test]
fn int4_constant_rows() {
    for &v in &[0.0f32, 1.0, -3.25, 0.1, 1234.567] {
        for &(sym, clip) in &[(false, false), (false, true), (true, false), (true, true)] {
            let w = vec![v; 2 * 64];
            let m = quantize_int4(&w, 2, 64, &opts(32, sym, clip)).unwrap();
            let d = deq(&m);
            if sym {
                // Symmetric represents v as a multiple of the scale: within half a step,
                // the scale being |v| / 7.5 (v > 0) or |v| / 8.5 (v < 0).
                let s = f64::from(m.scales[0].to_f32());
                assert!(s <= f64::from(v.abs()) / 7.5 * (1.0 + 1e-3));
                for x in &d {
                    let e = (x - f64::from(v)).abs();
                    assert!(e <= s / 2.0 + s * 1e-2 + 1e-9, "{v}: {x}");
                }
            } else {
                // No worse than rounding v to f16; exact (scale 0) when v is an f16.
                let v16 = f16::from_f32(v).to_f32();
                let bound = f64::from((v - v16).abs());
                for x in &d {
                    assert!((x - f64::from(v)).abs() <= bound + 1e-9, "{v}: {x}");
                }
                if v == v16 {
                    assert!(m.scales.iter().all(|s| s.to_f32() == 0.0));
                    assert!(d.iter().all(|x| *x == f64::from(v)));
                }
            }
        }
    }
}

#[test]
fn int4_error_cases() {
    let w = vec![0.0f32; 2 * 96];
    // K not a multiple of G.
    assert!(matches!(
        quantize_int4(&w, 2, 96, &opts(64, false, false)),
        Err(Error::GroupDoesNotDivide {
            k: 96,
            group: 64,
            ..
        })
    ));
    // Invalid G.
    for g in [0usize, 16, 48, 256] {
        assert!(matches!(
            quantize_int4(&w, 1, 192, &opts(g, false, false)),
            Err(Error::InvalidGroupSize { .. })
        ));
    }
    // Wrong length, N = 0.
    assert!(matches!(
        quantize_int4(&w, 4, 64, &opts(64, false, false)),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        quantize_int4(&[], 0, 64, &opts(64, false, false)),
        Err(Error::InvalidArgument { .. })
    ));
    // NaN and infinity name the row and column.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut w = vec![0.25f32; 3 * 64];
        w[2 * 64 + 37] = bad;
        for clip in [false, true] {
            match quantize_int4(&w, 3, 64, &opts(32, false, clip)) {
                Err(Error::InvalidArgument { what, reason }) => {
                    assert_eq!(what, "weights");
                    assert!(
                        reason.contains("row 2") && reason.contains("column 37"),
                        "{reason}"
                    );
                }
                other => panic!("expected InvalidArgument, got {other:?}"),
            }
        }
    }
    // A range that overflows f16.
    let mut w = vec![0.0f32; 64];
    w[3] = 1.0e6;
    w[4] = -1.0e6;
    assert!(matches!(
        quantize_int4(&w, 1, 64, &opts(64, false, false)),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        quantize_int4(&w, 1, 64, &opts(64, true, true)),
        Err(Error::InvalidArgument { .. })
    ));
    // Row function: wrong output lengths.
    let row = vec![0.0f32; 64];
    let o = opts(32, false, false);
    let (mut p, mut s, mut off) = (vec![0u8; 32], vec![f16::ZERO; 2], vec![f16::ZERO; 2]);
    assert!(quantize_int4_row(&row, &o, &mut p[..31], &mut s, &mut off).is_err());
    assert!(quantize_int4_row(&row, &o, &mut p, &mut s[..1], &mut off).is_err());
    assert!(quantize_int4_row(&row, &o, &mut p, &mut s, &mut off[..1]).is_err());
    assert!(quantize_int4_row(&row, &o, &mut p, &mut s, &mut off).is_ok());
    let mut row = row;
    row[9] = f32::NAN;
    match quantize_int4_row(&row, &o, &mut p, &mut s, &mut off) {
        Err(Error::InvalidArgument { what, reason }) => {
            assert_eq!(what, "weights");
            assert!(reason.contains("column 9"), "{reason}");
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// A larger matrix goes through the parallel path and gives the same result as row by
/// row.
#[test]
fn int4_large_matrix_parallel_matches_rows() {
    let mut rng = StdRng::seed_from_u64(9);
    let (n, k) = (257, 384);
    let w = sample(&mut rng, Dist::HeavyTailed, n * k);
    let o = opts(128, false, true);
    let m = quantize_int4(&w, n, k, &o).unwrap();
    let (mut p, mut s, mut off) = (vec![0u8; k / 2], vec![f16::ZERO; 3], vec![f16::ZERO; 3]);
    for r in [0, 128, 256] {
        quantize_int4_row(&w[r * k..(r + 1) * k], &o, &mut p, &mut s, &mut off).unwrap();
        assert_eq!(p, m.packed[r * k / 2..(r + 1) * k / 2]);
        assert_eq!(s, m.scales[r * 3..(r + 1) * 3]);
    }
}

/// The symmetric kind stores the codes and scales the offset form `-8 * scale` would
/// store, and dequantises to the same values in f32 (the kernels' arithmetic) and f64.
#[test]
fn int4_symmetric_equals_offset_form() {
    let mut rng = StdRng::seed_from_u64(21);
    for &g in &GROUPS {
        for &dist in &[Dist::Normal, Dist::HeavyTailed, Dist::Shifted] {
            for clip in [false, true] {
                let (n, k) = (rng.random_range(1..9usize), g * rng.random_range(1..4usize));
                let w = sample(&mut rng, dist, n * k);
                let m = quantize_int4(&w, n, k, &opts(g, true, clip)).unwrap();
                let twin = Q4Matrix {
                    kind: Q4Kind::Int4,
                    offsets: m
                        .scales
                        .iter()
                        .map(|s| f16::from_f32(-8.0 * s.to_f32()))
                        .collect(),
                    ..m.clone()
                };
                assert_eq!(deq(&m), deq(&twin), "G={g} {dist:?} clip={clip}");
                let (mut a, mut b) = (vec![f32::NAN; k], vec![f32::NAN; k]);
                for r in 0..n {
                    m.view().unwrap().dequantize_row(r, &mut a);
                    twin.view().unwrap().dequantize_row(r, &mut b);
                    assert_eq!(
                        a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    );
                }
            }
        }
    }
    // The row function refuses offset buffers for symmetric groups.
    let row = vec![0.5f32; 64];
    let (mut p, mut s, mut off) = (vec![0u8; 32], vec![f16::ZERO; 2], vec![f16::ZERO; 2]);
    let o = opts(32, true, false);
    assert!(matches!(
        quantize_int4_row(&row, &o, &mut p, &mut s, &mut off),
        Err(Error::LengthMismatch {
            expected: 0,
            found: 2,
            ..
        })
    ));
    quantize_int4_row(&row, &o, &mut p, &mut s, &mut []).unwrap();
}
