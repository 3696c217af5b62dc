//! Int8-activation INT4 linear layers on the CPU: the integer pipeline against an f64
//! reference built from the same quantised activations, the extra error of int8
//! activations against the f32-activation reference, and argument errors.

use half::f16;
use hiprune::backend::cpu::KernelPath;
use hiprune::backend::cpu::int8::{
    QuantizedActivations, SUM_BLOCK, linear_q4_int8, linear_q4_int8_quantized, quantize_activations,
};
use hiprune::quant::reference;
use hiprune::{Error, Q4Kind, Q4Matrix};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random INT4 matrix: codes uniform in 0..=15, scales in [0.002, 0.05], offsets either
/// symmetric (-8 * scale) or arbitrary.
fn random_int4(rng: &mut StdRng, n: usize, k: usize, group: usize) -> Q4Matrix {
    let packed = (0..n * k / 2)
        .map(|_| rng.random_range(0..=255u8))
        .collect();
    let groups = n * (k / group);
    let scales: Vec<f16> = (0..groups)
        .map(|_| f16::from_f32(rng.random_range(0.002f32..0.05)))
        .collect();
    let offsets = scales
        .iter()
        .map(|s| {
            if rng.random_range(0..2) == 0 {
                f16::from_f32(-8.0 * s.to_f32())
            } else {
                f16::from_f32(rng.random_range(-0.6f32..0.3))
            }
        })
        .collect();
    Q4Matrix {
        kind: Q4Kind::Int4,
        n,
        k,
        group,
        packed,
        scales,
        offsets,
    }
}

/// Activations with a different spread per row, including an all-zero row when there
/// are enough rows.
fn random_x(rng: &mut StdRng, m: usize, k: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(m * k);
    for row in 0..m {
        let spread = if row == 2 {
            0.0
        } else {
            10f32.powf(rng.random_range(-2.0f32..1.5))
        };
        x.extend((0..k).map(|_| spread * rng.random_range(-1.0f32..1.0)));
    }
    x
}

/// Approximately Gaussian samples (sum of four uniforms, unit variance).
fn gaussian(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let s: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum();
            s * (3.0f32 / 4.0).sqrt()
        })
        .collect()
}

/// The integer pipeline in f64 from the same quantised activations; returns
/// (reference, magnitude).
fn int8_reference(
    xq: &QuantizedActivations,
    w: &Q4Matrix,
    bias: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let view = w.view().unwrap();
    let wd = reference::dequantize(&view);
    let (m, n, k) = (xq.m(), w.n, w.k);
    let mut y = vec![0.0; m * n];
    let mut mag = vec![0.0; m * n];
    for i in 0..m {
        let sx = f64::from(xq.scales()[i]);
        let row = xq.row(i).unwrap();
        for j in 0..n {
            let b = bias.map_or(0.0, |b| f64::from(b[j]));
            let (mut acc, mut abs) = (0.0f64, 0.0f64);
            for t in 0..k {
                let p = wd[j * k + t] * f64::from(row[t]) * sx;
                acc += p;
                abs += p.abs();
            }
            y[i * n + j] = acc + b;
            mag[i * n + j] = abs + b.abs();
        }
    }
    (y, mag)
}

fn check_exact(path: KernelPath, rng: &mut StdRng, m: usize, n: usize, k: usize, group: usize) {
    let w = random_int4(rng, n, k, group);
    let view = w.view().unwrap();
    let x = random_x(rng, m, k);
    let bias: Option<Vec<f32>> = (rng.random_range(0..2) == 0)
        .then(|| (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect());
    let mut y = vec![f32::NAN; m * n];
    linear_q4_int8(path, &x, m, &view, bias.as_deref(), &mut y).unwrap();
    let xq = quantize_activations(&x, m, k).unwrap();
    let (want, mag) = int8_reference(&xq, &w, bias.as_deref());
    let mut worst = 0.0f64;
    for (idx, ((&got, &r), &mg)) in y.iter().zip(&want).zip(&mag).enumerate() {
        let err = (f64::from(got) - r).abs();
        assert!(
            err <= 1e-5 * mg,
            "{path} M={m} N={n} K={k} G={group}: y[{}, {}] = {got}, reference {r}, \
             magnitude {mg}",
            idx / n,
            idx % n
        );
        if mg > 0.0 {
            worst = worst.max(err / mg);
        }
    }
    // The prequantised entry point gives the same bits.
    let mut y2 = vec![f32::NAN; m * n];
    linear_q4_int8_quantized(path, &xq, &view, bias.as_deref(), &mut y2).unwrap();
    assert_eq!(
        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        y2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "{path}: linear_q4_int8 and linear_q4_int8_quantized differ"
    );
    assert!(worst <= 1e-5);
}

#[test]
fn integer_pipeline_matches_f64_reference_on_every_path() {
    let mut rng = StdRng::seed_from_u64(0x1a7e_0001);
    for path in KernelPath::available() {
        for &m in &[1usize, 3, 17, 64] {
            for &n in &[1usize, 7, 33, 129] {
                for &group in &[32usize, 64, 128] {
                    // K: a random multiple of 128 up to 2432 (which every G divides).
                    let k = 128 * rng.random_range(1..=19usize);
                    check_exact(path, &mut rng, m, n, k, group);
                }
            }
        }
        // The largest K, and shapes that cross the tile edges in both M and N.
        check_exact(path, &mut rng, 17, 33, 2432, 64);
        check_exact(path, &mut rng, 245, 161, 256, 32);
        check_exact(path, &mut rng, 1037, 7, 128, 128);
        println!("{path}: integer pipeline within 1e-5 of magnitude");
    }
}

#[test]
fn int8_activation_error_is_small_on_gaussian_data() {
    let mut rng = StdRng::seed_from_u64(0x1a7e_0002);
    let (m, n, k, group) = (48, 96, 1536, 64);
    let w = random_int4(&mut rng, n, k, group);
    let view = w.view().unwrap();
    let x = gaussian(&mut rng, m * k);
    let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let want = reference::linear_q4(&x, m, &view, Some(&bias));
    let xq = quantize_activations(&x, m, k).unwrap();
    // Expected error from rounding alone: uniform noise of width scale_x per element.
    let x_ms = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len() as f64;
    let noise_ms = xq
        .scales()
        .iter()
        .map(|&s| f64::from(s).powi(2) / 12.0)
        .sum::<f64>()
        / m as f64;
    let predicted = (noise_ms / x_ms).sqrt();
    for path in KernelPath::available() {
        let mut y = vec![f32::NAN; m * n];
        linear_q4_int8(path, &x, m, &view, Some(&bias), &mut y).unwrap();
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&got, &r) in y.iter().zip(&want) {
            num += (f64::from(got) - r).powi(2);
            den += r * r;
        }
        let rel = (num / den).sqrt();
        println!(
            "{path}: int8 activations vs f32 reference, relative Frobenius error {rel:.3e} \
             (rounding-noise prediction {predicted:.3e})"
        );
        assert!(rel < 1.5e-2, "{path}: relative error {rel}");
        assert!(
            rel < 1.5 * predicted,
            "{path}: relative error {rel} above 1.5x the prediction {predicted}"
        );
    }
}

#[test]
fn quantize_activations_rounds_per_row() {
    let mut rng = StdRng::seed_from_u64(0x1a7e_0003);
    let (m, k) = (9, 77);
    let x = random_x(&mut rng, m, k);
    let xq = quantize_activations(&x, m, k).unwrap();
    assert_eq!((xq.m(), xq.k()), (m, k));
    assert_eq!(xq.blocks_per_row(), k.div_ceil(SUM_BLOCK));
    for i in 0..m {
        let row = &x[i * k..(i + 1) * k];
        let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = xq.scales()[i];
        assert_eq!(s, amax / 127.0, "row {i} scale");
        let q = xq.row(i).unwrap();
        assert!(q.iter().all(|&v| (-127..=127).contains(&v)));
        if amax > 0.0 {
            assert!(
                q.iter().any(|&v| v.abs() == 127),
                "row {i} uses the full range"
            );
        }
        for (&v, &c) in row.iter().zip(q) {
            assert!(
                (f64::from(v) - f64::from(s) * f64::from(c)).abs() <= 0.5001 * f64::from(s),
                "row {i}: {v} quantised to {c} x {s}"
            );
        }
        let bpr = xq.blocks_per_row();
        for (b, chunk) in q.chunks(SUM_BLOCK).enumerate() {
            let sum: i32 = chunk.iter().map(|&v| i32::from(v)).sum();
            assert_eq!(xq.block_sums()[i * bpr + b], sum);
        }
    }
    assert!(xq.row(m).is_none());

    // A row of tiny (subnormal) values has no usable scale: it quantises to zero.
    let tiny = vec![1e-40f32, -3e-40, 0.0, 2e-41];
    let tq = quantize_activations(&tiny, 1, 4).unwrap();
    assert_eq!(tq.scales(), &[0.0]);
    assert!(tq.values().iter().all(|&v| v == 0));
    assert!(xq.group_sums(48).is_err());
}

#[test]
fn non_finite_activations_are_rejected() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![0.5f32; 3 * 64];
        x[64 + 17] = bad;
        let err = quantize_activations(&x, 3, 64).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        assert!(err.to_string().contains("row 1"), "{err}");
    }
}

#[test]
fn errors_for_nf4_bad_lengths_and_unavailable_paths() {
    let mut rng = StdRng::seed_from_u64(0x1a7e_0004);
    let (m, n, k, group) = (3, 5, 128, 64);
    let w = random_int4(&mut rng, n, k, group);
    let view = w.view().unwrap();
    let x = random_x(&mut rng, m, k);
    let bias = vec![0.0f32; n];
    let path = KernelPath::Portable;

    let nf4 = Q4Matrix {
        kind: Q4Kind::Nf4,
        offsets: Vec::new(),
        ..w.clone()
    };
    let mut y = vec![0.0f32; m * n];
    let err = linear_q4_int8(path, &x, m, &nf4.view().unwrap(), None, &mut y).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("nf4"), "{err}");

    let err = linear_q4_int8(path, &x[1..], m, &view, None, &mut y).unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { .. }), "{err}");
    let mut short = vec![0.0f32; m * n - 1];
    let err = linear_q4_int8(path, &x, m, &view, None, &mut short).unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { .. }), "{err}");
    let err = linear_q4_int8(path, &x, m, &view, Some(&bias[1..]), &mut y).unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { .. }), "{err}");
    let err = quantize_activations(&x, m + 1, k).unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { .. }), "{err}");
    let xq_other_k = quantize_activations(&x, m * 2, k / 2).unwrap();
    let err = linear_q4_int8_quantized(path, &xq_other_k, &view, None, &mut y).unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { .. }), "{err}");

    let available = KernelPath::available();
    for p in [KernelPath::Avx2, KernelPath::Avx512, KernelPath::Avx512Vnni] {
        if !available.contains(&p) {
            let err = linear_q4_int8(p, &x, m, &view, None, &mut y).unwrap_err();
            assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        }
    }

    // M = 0 is an empty product, not an error.
    linear_q4_int8(path, &[], 0, &view, None, &mut []).unwrap();
}

/// Symmetric INT4 (no stored offsets) runs as INT4 with `offset = -8 * scale`: the same
/// bits as that twin on every path, and within 1e-5 of the f64 integer reference.
#[test]
fn symmetric_int4_matches_its_offset_twin_on_every_path() {
    let mut rng = StdRng::seed_from_u64(0x1a7e_0005);
    for path in KernelPath::available() {
        for &(m, n, k, group) in &[
            (1usize, 7usize, 128usize, 32usize),
            (17, 33, 2432, 64),
            (64, 129, 384, 128),
            (245, 161, 256, 32),
        ] {
            let base = random_int4(&mut rng, n, k, group);
            let sym = Q4Matrix {
                kind: Q4Kind::Int4Sym,
                offsets: Vec::new(),
                ..base.clone()
            };
            let twin = Q4Matrix {
                offsets: sym
                    .scales
                    .iter()
                    .map(|s| f16::from_f32(-8.0 * s.to_f32()))
                    .collect(),
                ..base
            };
            let x = random_x(&mut rng, m, k);
            let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let mut y_sym = vec![f32::NAN; m * n];
            let mut y_twin = vec![f32::NAN; m * n];
            linear_q4_int8(path, &x, m, &sym.view().unwrap(), Some(&bias), &mut y_sym).unwrap();
            linear_q4_int8(path, &x, m, &twin.view().unwrap(), Some(&bias), &mut y_twin).unwrap();
            assert_eq!(
                y_sym.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y_twin.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{path} M={m} N={n} K={k} G={group}"
            );
            let xq = quantize_activations(&x, m, k).unwrap();
            let (want, mag) = int8_reference(&xq, &twin, Some(&bias));
            for ((&got, &r), &mg) in y_sym.iter().zip(&want).zip(&mag) {
                assert!(
                    (f64::from(got) - r).abs() <= 1e-5 * mg,
                    "{path}: {got} vs {r}"
                );
            }
        }
    }
}
