//! The CPU `linear` entry point (dense f32/f16/bf16 and 4-bit weights through the panel
//! path) against the f64 reference, on fresh random inputs and awkward shapes.

use half::{bf16, f16};
use hiprune::backend::cpu::{KernelPath, linear, linear_with_path};
use hiprune::quant::{DenseData, LinearWeights};
use hiprune::quant::{Q4Kind, Q4Weights, reference};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random_vec(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Asserts `|y - ref| <= tol * magnitude` element by element (NaN fails).
fn assert_close(y: &[f32], reference: &[f64], magnitude: &[f64], tol: f64, what: &str) {
    assert_eq!(y.len(), reference.len());
    for (i, ((&got, &want), &mag)) in y.iter().zip(reference).zip(magnitude).enumerate() {
        let err = (f64::from(got) - want).abs();
        assert!(
            err <= tol * mag.max(f64::MIN_POSITIVE),
            "{what}: element {i}: got {got}, want {want}, |err| {err:e} > {tol:e} * {mag:e}"
        );
    }
}

#[test]
fn dense_f32_f16_bf16_match_reference() {
    let mut rng = StdRng::seed_from_u64(0x11ea);
    for &(m, n, k) in &[
        (1, 1, 1),
        (3, 7, 33),
        (17, 65, 100),
        (64, 129, 257),
        (300, 70, 96),
    ] {
        let x = random_vec(&mut rng, m * k, 1.0);
        let w32 = random_vec(&mut rng, n * k, 0.5);
        let bias = random_vec(&mut rng, n, 1.0);
        let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        let wbf: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let cases = [
            (
                "f32",
                DenseData::F32(&w32),
                w32.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            ),
            (
                "f16",
                DenseData::F16(&w16),
                w16.iter().map(|v| f64::from(v.to_f32())).collect(),
            ),
            (
                "bf16",
                DenseData::Bf16(&wbf),
                wbf.iter().map(|v| f64::from(v.to_f32())).collect(),
            ),
        ];
        for (name, data, w64) in cases {
            for b in [None, Some(bias.as_slice())] {
                let w = LinearWeights::dense(data, n, k).unwrap();
                let mut y = vec![f32::NAN; m * n];
                linear(&x, m, &w, b, &mut y).unwrap();
                let want = reference::linear_f64(&x, m, &w64, n, k, b);
                let mag = reference::linear_magnitude(&x, m, &w64, n, k, b);
                assert_close(&y, &want, &mag, 1e-5, &format!("{name} m={m} n={n} k={k}"));
            }
        }
    }
}

#[test]
fn q4_panel_path_matches_reference() {
    let mut rng = StdRng::seed_from_u64(0x4b17);
    for kind in [Q4Kind::Int4, Q4Kind::Nf4, Q4Kind::Int4Sym] {
        for &group in &[32usize, 64, 128] {
            for &(m, n, groups) in &[
                (9, 1, 1),
                (17, 7, 3),
                (64, 65, 2),
                (100, 129, 5),
                (33, 200, 38),
            ] {
                let k = group * groups;
                let packed: Vec<u8> = (0..n * k / 2).map(|_| rng.random()).collect();
                let scales: Vec<f16> = (0..n * groups)
                    .map(|_| f16::from_f32(rng.random_range(0.001..0.1)))
                    .collect();
                let offsets: Vec<f16> = if kind.has_offsets() {
                    (0..n * groups)
                        .map(|_| f16::from_f32(rng.random_range(-0.8..0.0)))
                        .collect()
                } else {
                    Vec::new()
                };
                let w = Q4Weights::new(kind, n, k, group, &packed, &scales, &offsets).unwrap();
                let x = random_vec(&mut rng, m * k, 1.0);
                let bias = random_vec(&mut rng, n, 1.0);
                let deq = reference::dequantize(&w);
                for b in [None, Some(bias.as_slice())] {
                    let want = reference::linear_f64(&x, m, &deq, n, k, b);
                    let mag = reference::linear_magnitude(&x, m, &deq, n, k, b);
                    for path in KernelPath::available() {
                        let mut y = vec![f32::NAN; m * n];
                        linear_with_path(path, &x, m, &LinearWeights::Q4(w), b, &mut y).unwrap();
                        let what = format!("{path} {kind} g{group} m={m} n={n} k={k}");
                        assert_close(&y, &want, &mag, 1e-5, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn wrong_lengths_are_typed_errors() {
    let w32 = vec![0.5f32; 6];
    let w = LinearWeights::dense(DenseData::F32(&w32), 2, 3).unwrap();
    let mut y = vec![0.0; 2];
    let err = linear(&[1.0; 4], 1, &w, None, &mut y).unwrap_err();
    assert!(
        matches!(
            err,
            hiprune::Error::LengthMismatch {
                expected: 3,
                found: 4,
                ..
            }
        ),
        "{err}"
    );
    let err = linear(&[1.0; 3], 1, &w, None, &mut [0.0; 3]).unwrap_err();
    assert!(
        matches!(
            err,
            hiprune::Error::LengthMismatch {
                expected: 2,
                found: 3,
                ..
            }
        ),
        "{err}"
    );
    let err = linear(&[1.0; 3], 1, &w, Some(&[0.0; 5]), &mut y).unwrap_err();
    assert!(
        matches!(
            err,
            hiprune::Error::LengthMismatch {
                expected: 2,
                found: 5,
                ..
            }
        ),
        "{err}"
    );
    let err = LinearWeights::dense(DenseData::F32(&w32), 4, 3).unwrap_err();
    assert!(
        matches!(
            err,
            hiprune::Error::LengthMismatch {
                expected: 12,
                found: 6,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn q4_panel_path_blocks_long_rows() {
    // Tall panels (512 rows) of a long row (K = 2560) exceed one decoded tile, so the
    // K dimension is walked in blocks that accumulate into y.
    let mut rng = StdRng::seed_from_u64(0xb10c);
    let (m, n, k, group) = (5, 4100, 2560, 64);
    let packed: Vec<u8> = (0..n * k / 2).map(|_| rng.random()).collect();
    let scales: Vec<f16> = (0..n * k / group)
        .map(|_| f16::from_f32(rng.random_range(0.001..0.1)))
        .collect();
    let offsets: Vec<f16> = (0..n * k / group)
        .map(|_| f16::from_f32(rng.random_range(-0.8..0.0)))
        .collect();
    let w = Q4Weights::new(Q4Kind::Int4, n, k, group, &packed, &scales, &offsets).unwrap();
    let x = random_vec(&mut rng, m * k, 1.0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let deq = reference::dequantize(&w);
    let want = reference::linear_f64(&x, m, &deq, n, k, None);
    let mag = reference::linear_magnitude(&x, m, &deq, n, k, None);
    for path in KernelPath::available() {
        let mut y = vec![f32::NAN; m * n];
        pool.install(|| linear_with_path(path, &x, m, &LinearWeights::Q4(w), None, &mut y))
            .unwrap();
        assert_close(&y, &want, &mag, 1e-5, &format!("{path} int4 g64 blocked K"));
    }
}
