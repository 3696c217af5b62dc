//! CUDA linear layers against the f64 reference.
//!
//! Every GPU test asks [`gpu`] for the device: without one it prints `skipped: <reason>`
//! and passes, unless `HIPRUNE_REQUIRE_GPU=1` (set by scripts/gpu-check.sh), where a
//! missing device fails the test instead.
#![cfg(feature = "cuda")]

mod common;

use half::f16;
use hiprune::backend::cuda::{
    CudaDenseLinear, CudaDevice, CudaQ4Linear, CudaTensorF16, GEMV_MAX_M, MemoryPurpose, Q4Kernel,
};
use hiprune::quant::{Q4Kind, reference};
use hiprune::{Error, Q4Weights};
use rand::Rng;
use rand::rngs::StdRng;

/// Tolerance on `max |y - ref| / max |ref|` for f16 outputs. The inputs (x, scales,
/// offsets, bias) are exact f16 values in both computations, so the only differences are
/// the kernel's f32 accumulation (relative error around K * 2^-24 < 6e-4 of
/// sum |x w| even for K = 9728, and far less in practice since rounding errors
/// partly cancel) and the final rounding to f16 (2^-11 = 4.9e-4 relative to |y| <= max
/// |ref|). 2e-3 leaves room for both and still fails on any wrong index, dropped
/// group or missing bias, which move the output by O(1) relative to max |ref|.
const TOL: f64 = 2e-3;

/// The device, or `None` after printing why the test is skipped. Panics instead when
/// `HIPRUNE_REQUIRE_GPU=1`.
fn gpu() -> Option<CudaDevice> {
    match CudaDevice::new(0) {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("HIPRUNE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("HIPRUNE_REQUIRE_GPU=1 but no CUDA device: {e}");
            }
            println!("skipped: {e}");
            None
        }
    }
}

/// Every kind the CUDA backend runs.
fn kinds() -> Vec<Q4Kind> {
    vec![Q4Kind::Int4, Q4Kind::Int4Sym, Q4Kind::Nf4]
}

/// Random f16 values in `[-1, 1)`, returned as f16 and as the same values in f32.
fn random_f16(rng: &mut StdRng, len: usize) -> (Vec<f16>, Vec<f32>) {
    let h: Vec<f16> = (0..len)
        .map(|_| f16::from_f32(rng.random_range(-1.0f32..1.0)))
        .collect();
    let f = h.iter().map(|v| v.to_f32()).collect();
    (h, f)
}

/// The rows checked against the reference: all of them for small M, otherwise the first,
/// the last and a few random ones (the f64 reference of a [4096, 14592 x 2432] product
/// would take minutes; unwritten elements are caught on every row by the NaN check).
fn sample_rows(rng: &mut StdRng, m: usize) -> Vec<usize> {
    if m <= 9 {
        return (0..m).collect();
    }
    let mut rows = vec![0, m - 1];
    rows.extend((0..4).map(|_| rng.random_range(1..m - 1)));
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// Checks `y` (all of `[m, n]`) against the reference on `rows`: every element finite
/// (NaN poison overwritten), sampled rows within [`TOL`] of `max |ref|`.
fn check_output(
    what: &str,
    y: &[f16],
    m: usize,
    n: usize,
    rows: &[usize],
    reference_rows: &[f64],
) -> f64 {
    assert_eq!(y.len(), m * n, "{what}: output length");
    if let Some(i) = y.iter().position(|v| !v.is_finite()) {
        panic!(
            "{what}: element ({}, {}) is {} (never written, or overflowed)",
            i / n,
            i % n,
            y[i]
        );
    }
    let scale = reference_rows
        .iter()
        .fold(0.0f64, |a, v| a.max(v.abs()))
        .max(1e-30);
    let mut worst = 0.0f64;
    let mut at = (0, 0);
    for (ri, &row) in rows.iter().enumerate() {
        for col in 0..n {
            let got = f64::from(y[row * n + col].to_f32());
            let err = (got - reference_rows[ri * n + col]).abs() / scale;
            if err > worst {
                worst = err;
                at = (row, col);
            }
        }
    }
    assert!(
        worst <= TOL,
        "{what}: relative error {worst:.3e} > {TOL:e} at {at:?} (max |ref| {scale:.3e})"
    );
    worst
}

/// One 4-bit case: upload, run with NaN-poisoned outputs, compare. For `m <= 8` both the
/// GEMV and the GEMM kernel run.
fn run_q4_case(
    dev: &CudaDevice,
    rng: &mut StdRng,
    kind: Q4Kind,
    m: usize,
    n: usize,
    k: usize,
) -> f64 {
    let groups: Vec<usize> = kind
        .allowed_groups()
        .iter()
        .copied()
        .filter(|&g| k.is_multiple_of(g))
        .collect();
    let group = groups[rng.random_range(0..groups.len())];
    let w = common::random_q4(rng, kind, n, k, group);
    let view = w.view().expect("valid matrix");
    let with_bias = rng.random_range(0..3) > 0;
    let bias: Option<Vec<f32>> =
        with_bias.then(|| (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect());
    let layer = CudaQ4Linear::upload(dev, view, bias.as_deref()).expect("upload");
    let (xh, xf) = random_f16(rng, m * k);
    let x = dev.upload_f16(&xh, m, k).expect("upload x");

    let rows = sample_rows(rng, m);
    let x_rows: Vec<f32> = rows
        .iter()
        .flat_map(|&r| xf[r * k..(r + 1) * k].iter().copied())
        .collect();
    // The device holds the bias in f16: the reference uses the same rounded values.
    let bias_f16: Option<Vec<f32>> = bias
        .as_ref()
        .map(|b| b.iter().map(|&v| f16::from_f32(v).to_f32()).collect());
    let want = reference::linear_q4(&x_rows, rows.len(), &view, bias_f16.as_deref());

    let mut kernels = vec![Q4Kernel::Auto];
    if m <= GEMV_MAX_M {
        kernels.push(Q4Kernel::Gemm);
    }
    let mut worst = 0.0f64;
    for kernel in kernels {
        let mut y = dev.full_f16(m, n, f16::NAN).expect("alloc y");
        layer
            .forward_into(&x, &mut y, kernel)
            .unwrap_or_else(|e| panic!("{kind} {kernel:?} m={m} n={n} k={k} g={group}: {e}"));
        let got = dev.download_f16(&y).expect("download y");
        let what = format!("{kind} {kernel:?} m={m} n={n} k={k} g={group} bias={with_bias}");
        worst = worst.max(check_output(&what, &got, m, n, &rows, &want));
    }
    worst
}

/// Edge shapes: N in {1, 7, 129}, K in {32, 96, 4160}, every M of the sweep.
fn q4_edge_sweep(kind: Q4Kind) {
    let Some(dev) = gpu() else { return };
    let mut rng = common::seeded_rng(&format!("q4_edge_sweep_{kind}"));
    let mut worst = 0.0f64;
    for n in [1, 7, 129] {
        for k in [32, 96, 4160] {
            for m in [1, 2, 7, 8, 9, 64, 333, 4096] {
                worst = worst.max(run_q4_case(&dev, &mut rng, kind, m, n, k));
            }
        }
    }
    println!("{kind} edge sweep: worst relative error {worst:.3e}");
}

/// SD3.5 layer shapes (N, K): Large (D = 2432) and Medium (D = 1536): attention
/// projections [D, D], FFN up [4D, D] and down [D, 4D], adaLN modulation [6D, D]
/// (Large) and [9D, D] (MMDiT-X), each at a few M.
fn q4_model_shapes(kind: Q4Kind) {
    let Some(dev) = gpu() else { return };
    let mut rng = common::seeded_rng(&format!("q4_model_shapes_{kind}"));
    let cases: &[(usize, usize, &[usize])] = &[
        (2432, 2432, &[1, 9, 4096]),
        (9728, 2432, &[2, 333]),
        (2432, 9728, &[1, 64, 4096]),
        (14592, 2432, &[1, 8, 333]),
        (1536, 1536, &[7, 4096]),
        (6144, 1536, &[1, 64]),
        (1536, 6144, &[2, 333]),
        (13824, 1536, &[1, 9]),
    ];
    let mut worst = 0.0f64;
    for &(n, k, ms) in cases {
        for &m in ms {
            worst = worst.max(run_q4_case(&dev, &mut rng, kind, m, n, k));
        }
    }
    println!("{kind} model shapes: worst relative error {worst:.3e}");
}

#[test]
fn q4_edge_sweep_int4() {
    q4_edge_sweep(Q4Kind::Int4);
}

#[test]
fn q4_edge_sweep_nf4() {
    q4_edge_sweep(Q4Kind::Nf4);
}

#[test]
fn q4_model_shapes_int4() {
    q4_model_shapes(Q4Kind::Int4);
}

#[test]
fn q4_model_shapes_nf4() {
    q4_model_shapes(Q4Kind::Nf4);
}

#[test]
fn q4_edge_sweep_int4sym() {
    q4_edge_sweep(Q4Kind::Int4Sym);
}

#[test]
fn q4_model_shapes_int4sym() {
    q4_model_shapes(Q4Kind::Int4Sym);
}

#[test]
fn q4_small_shapes_every_kind() {
    let Some(dev) = gpu() else { return };
    let mut rng = common::seeded_rng("q4_small_shapes_every_kind");
    for kind in kinds() {
        run_q4_case(&dev, &mut rng, kind, 3, 40, 64);
        run_q4_case(&dev, &mut rng, kind, 17, 40, 64);
    }
}

#[test]
fn dense_f16_matches_reference() {
    let Some(dev) = gpu() else { return };
    if !hiprune::backend::cuda::cublas_present() {
        if std::env::var("HIPRUNE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("HIPRUNE_REQUIRE_GPU=1 but cuBLAS (libcublas.so) cannot be loaded");
        }
        println!("skipped: cuBLAS (libcublas.so) cannot be loaded");
        return;
    }
    let mut rng = common::seeded_rng("dense_f16_matches_reference");
    let cases = [
        (1, 1, 32),
        (2, 7, 96),
        (9, 129, 4160),
        (333, 2432, 2432),
        (4096, 1536, 1536),
        (8, 14592, 2432),
        (64, 2432, 9728),
    ];
    for (m, n, k) in cases {
        let (wh, wf) = random_f16(&mut rng, n * k);
        // Scale the weights down so that sums over K stay well inside f16.
        let scale = 1.0 / (k as f32).sqrt();
        let wh: Vec<f16> = wh
            .iter()
            .map(|v| f16::from_f32(v.to_f32() * scale))
            .collect();
        let w64: Vec<f64> = wh.iter().map(|v| f64::from(v.to_f32())).collect();
        drop(wf);
        let bias: Option<Vec<f32>> = (rng.random_range(0..2) == 1).then(|| {
            (0..n)
                .map(|_| f16::from_f32(rng.random_range(-0.5f32..0.5)).to_f32())
                .collect()
        });
        let layer = CudaDenseLinear::upload(&dev, &wh, n, k, bias.as_deref()).expect("upload");
        let (xh, xf) = random_f16(&mut rng, m * k);
        let x = dev.upload_f16(&xh, m, k).expect("upload x");
        let mut y = dev.full_f16(m, n, f16::NAN).expect("alloc y");
        layer.forward_into(&x, &mut y).expect("forward");
        let got = dev.download_f16(&y).expect("download");
        let rows = sample_rows(&mut rng, m);
        let x_rows: Vec<f32> = rows
            .iter()
            .flat_map(|&r| xf[r * k..(r + 1) * k].iter().copied())
            .collect();
        let want = reference::linear_f64(&x_rows, rows.len(), &w64, n, k, bias.as_deref());
        check_output(
            &format!("dense m={m} n={n} k={k} bias={}", bias.is_some()),
            &got,
            m,
            n,
            &rows,
            &want,
        );
    }
}

#[test]
fn device_new_never_panics() {
    // On any machine: a device, or NoCudaDevice saying why. Never a panic.
    match CudaDevice::new(0) {
        Ok(dev) => {
            let (major, _minor) = dev.compute_capability();
            assert!(major >= 5, "compute capability {major}.x");
            assert!(!dev.name().is_empty());
            assert!(dev.total_memory() > 0);
            let free = dev.free_memory().expect("free memory");
            assert!(free <= dev.total_memory());
            println!(
                "device 0: {} (sm_{major}{}), {} MiB",
                dev.name(),
                dev.compute_capability().1,
                dev.total_memory() >> 20
            );
        }
        Err(Error::NoCudaDevice { reason }) => {
            assert!(!reason.is_empty());
            if std::env::var("HIPRUNE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("HIPRUNE_REQUIRE_GPU=1 but no CUDA device: {reason}");
            }
            println!("no CUDA device: {reason}");
        }
        Err(e) => panic!("expected a device or NoCudaDevice, got {e}"),
    }
    // No machine has this many GPUs.
    match CudaDevice::new(100_000) {
        Err(Error::NoCudaDevice { reason }) => assert!(!reason.is_empty()),
        other => panic!("ordinal 100000: expected NoCudaDevice, got {other:?}"),
    }
    if !hiprune::backend::cuda::driver_present() {
        assert!(matches!(
            CudaDevice::new(0),
            Err(Error::NoCudaDevice { .. })
        ));
    }
}

#[test]
fn memory_is_accounted_by_purpose() {
    let Some(dev) = gpu() else { return };
    let mut rng = common::seeded_rng("memory_is_accounted_by_purpose");
    let before = dev.memory();
    let (n, k) = (129, 4160);
    let w = common::random_q4(&mut rng, Q4Kind::Int4, n, k, 64);
    let bias = vec![0.25f32; n];
    let layer = CudaQ4Linear::upload(&dev, w.view().unwrap(), Some(&bias)).unwrap();
    let after = dev.memory();
    assert_eq!(
        after.weights.current - before.weights.current,
        layer.device_bytes()
    );
    // Repacked codes are at least n * k / 2; scales, offsets and bias are f16.
    assert!(layer.device_bytes() >= (n * k / 2 + 2 * 2 * n * (k / 64) + 2 * n) as u64);
    // The canonical codes were scratch during the repack and are gone again.
    assert_eq!(after.scratch.current, before.scratch.current);
    assert!(after.scratch.peak >= before.scratch.current + (n * k / 2) as u64);
    let x = dev.full_f16(5, k, f16::ONE).unwrap();
    let y = layer.forward(&x).unwrap();
    assert_eq!(y.buffer().purpose(), MemoryPurpose::Scratch);
    let during = dev.memory();
    assert_eq!(
        during.scratch.current - before.scratch.current,
        (5 * k + 5 * n) as u64 * 2
    );
    assert!(during.total.peak >= during.total.current);
    drop((x, y, layer));
    let end = dev.memory();
    assert_eq!(end.weights.current, before.weights.current);
    assert_eq!(end.scratch.current, before.scratch.current);
    assert!(end.weights.peak >= after.weights.current);
}

#[test]
fn bad_arguments_are_errors() {
    let Some(dev) = gpu() else { return };
    let mut rng = common::seeded_rng("bad_arguments_are_errors");
    let w = common::random_q4(&mut rng, Q4Kind::Nf4, 16, 64, 32);
    let view: Q4Weights<'_> = w.view().unwrap();
    assert!(matches!(
        CudaQ4Linear::upload(&dev, view, Some(&[0.0; 15])),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        CudaQ4Linear::upload(&dev, view, Some(&[1e6; 16])),
        Err(Error::InvalidArgument { .. })
    ));
    let layer = CudaQ4Linear::upload(&dev, view, None).unwrap();
    let x_wrong_k = dev.full_f16(2, 32, f16::ONE).unwrap();
    assert!(matches!(
        layer.forward(&x_wrong_k),
        Err(Error::ShapeMismatch { .. })
    ));
    let x = dev.full_f16(9, 64, f16::ONE).unwrap();
    let mut y_wrong = dev.full_f16(9, 15, f16::ZERO).unwrap();
    assert!(matches!(
        layer.forward_into(&x, &mut y_wrong, Q4Kernel::Auto),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut y = dev.full_f16(9, 16, f16::ZERO).unwrap();
    assert!(matches!(
        layer.forward_into(&x, &mut y, Q4Kernel::Gemv),
        Err(Error::InvalidArgument { .. })
    ));
    // A tensor of another handle is refused, not used across streams.
    let other = CudaDevice::new(0).unwrap();
    let x_other: CudaTensorF16 = other.full_f16(9, 64, f16::ONE).unwrap();
    assert!(matches!(
        layer.forward_into(&x_other, &mut y, Q4Kernel::Auto),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        dev.upload_f16(&[f16::ONE; 5], 2, 3),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        dev.full_f16(0, 3, f16::ONE),
        Err(Error::InvalidArgument { .. })
    ));
}
