//! Every op of the CUDA backend against the CPU backend on the same inputs (fresh random
//! values, awkward shapes), and a refused shape per op.
//!
//! Every GPU test asks `common::gpu` for the device: without one it prints
//! `skipped: <reason>` and passes, unless `HIPRUNE_REQUIRE_GPU=1`, where a missing
//! device fails the test instead. The backend runs with NaN-poisoned outputs, so an
//! element that no kernel wrote fails the finiteness check of [`compare`].
//!
//! Inputs are drawn as f16 values (the CUDA backend's activation type), so both
//! backends see exactly the same numbers and the differences measured are the device's
//! arithmetic only. Tolerances are on `max |cuda - cpu| / max |cpu|`:
//! - copies (concat, split, column chunks, upload/download): exact;
//! - elementwise ops (`x + g * y`, SiLU, GELU-tanh): one f32 evaluation of exact f16
//!   inputs, then one rounding to f16 (at most 2^-11 = 4.9e-4 of |y|); `__expf` and
//!   `tanhf` add a few f32 ulps. [`TOL_ELEMENTWISE`] = 1e-3;
//! - norms, linear layers and attention: f32 statistics / accumulation (relative error
//!   of order K * 2^-24, below 1e-4 for these sizes) plus the f16 rounding of the
//!   output; the CPU uses f32/f64. [`TOL_REDUCE`] = 2e-3. Any indexing error (wrong
//!   head, batch item, group or chunk) moves the output by O(1) of max |ref|.
#![cfg(feature = "cuda")]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use half::{bf16, f16};
use hiprune::backend::cuda::{CudaBackend, CudaLinear, CudaTensorF16};
use hiprune::backend::{
    Activation, Backend, CpuBackend, CpuTensor, Device, GroupNorm, ImageShape, LinearLayer,
    LinearSource, Modulation,
};
use hiprune::quant::{DenseData, LinearWeights};
use hiprune::quant::{Q4Kind, Q4Matrix};
use hiprune::{Error, Result};
use rand::Rng;
use rand::rngs::StdRng;

const TOL_ELEMENTWISE: f64 = 1e-3;
const TOL_REDUCE: f64 = 2e-3;

/// The two backends under comparison.
struct Pair {
    cpu: CpuBackend,
    gpu: CudaBackend,
}

fn pair() -> Option<Pair> {
    common::gpu().map(|g| Pair {
        cpu: CpuBackend::new(),
        gpu: g.poison_outputs(true),
    })
}

impl Pair {
    fn up(&self, data: &[f32], rows: usize, cols: usize) -> (CpuTensor, CudaTensorF16) {
        (
            self.cpu.upload(data, rows, cols).expect("cpu upload"),
            self.gpu.upload(data, rows, cols).expect("cuda upload"),
        )
    }

    fn down(&self, t: &CudaTensorF16) -> Vec<f32> {
        self.gpu.download(t).expect("download")
    }
}

/// `len` random values in `[-range, range)`, each exactly representable in f16.
fn values(rng: &mut StdRng, len: usize, range: f32) -> Vec<f32> {
    (0..len)
        .map(|_| f16::from_f32(rng.random_range(-range..range)).to_f32())
        .collect()
}

/// Checks every element finite and `max |got - want| / max |want| <= tol`.
fn compare(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!(
            "{what}: element {i} is {} (never written, or overflowed)",
            got[i]
        );
    }
    let scale = want
        .iter()
        .fold(0.0f64, |m, &v| m.max(f64::from(v).abs()))
        .max(1e-30);
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (f64::from(g) - f64::from(w)).abs() / scale;
        if e > worst {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= tol,
        "{what}: relative error {worst:.3e} > {tol:e} at element {at} (got {}, want {}, max |ref| {scale:.3e})",
        got[at],
        want[at]
    );
}

fn assert_err<T: std::fmt::Debug>(what: &str, r: Result<T>) -> Error {
    match r {
        Ok(v) => panic!("{what}: accepted, gave {v:?}"),
        Err(e) => {
            println!("{what}: {e}");
            e
        }
    }
}

#[test]
fn open_takes_cuda_devices_only() {
    let e = CudaBackend::open(Device::Cpu).expect_err("the CPU device");
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    match CudaBackend::open(Device::Cuda(0)) {
        Ok(b) => assert_eq!(b.device(), Device::Cuda(0)),
        Err(e) => assert!(matches!(e, Error::NoCudaDevice { .. }), "{e}"),
    }
    if let Some(p) = pair() {
        let e = CudaBackend::open(Device::Cuda(4096)).expect_err("ordinal out of range");
        assert!(matches!(e, Error::NoCudaDevice { .. }), "{e}");
        drop(p);
    }
}

#[test]
fn upload_download_round_trip() {
    let Some(p) = pair() else { return };
    let mut rng = common::seeded_rng("upload_download_round_trip");
    for (rows, cols) in [(1, 1), (7, 3), (333, 48), (2, 2432)] {
        let data = values(&mut rng, rows * cols, 100.0);
        let t = p.gpu.upload(&data, rows, cols).expect("upload");
        assert_eq!((t.rows(), Activation::cols(&t)), (rows, cols));
        assert_eq!(p.down(&t), data, "[{rows}, {cols}] round trip");
    }
    assert_err("wrong length", p.gpu.upload(&[1.0; 5], 2, 3));
    assert_err("empty", p.gpu.upload(&[], 0, 3));
    assert_err("not finite in f16", p.gpu.upload(&[1.0, 1e6], 1, 2));
    assert_err("NaN", p.gpu.upload(&[f32::NAN], 1, 1));
}

#[test]
fn dense_linear_matches_cpu() {
    let Some(p) = pair() else { return };
    let mut rng = common::seeded_rng("dense_linear_matches_cpu");
    for (m, n, k) in [
        (1, 16, 24),
        (7, 192, 96),
        (333, 40, 12),
        (9, 5, 3),
        (8, 130, 2432),
    ] {
        for with_bias in [false, true] {
            let w = values(&mut rng, n * k, 1.0 / (k as f32).sqrt());
            let bias = with_bias.then(|| values(&mut rng, n, 0.5));
            let cl = p.cpu.upload_dense(&w, n, k, bias.as_deref()).unwrap();
            let gl = p.gpu.upload_dense(&w, n, k, bias.as_deref()).unwrap();
            assert!(matches!(gl, CudaLinear::Dense(_)));
            assert_eq!((gl.n(), gl.k()), (n, k));
            let x = values(&mut rng, m * k, 2.0);
            let (cx, gx) = p.up(&x, m, k);
            let want = p.cpu.linear(&cx, &cl).unwrap();
            let got = p.gpu.linear(&gx, &gl).unwrap();
            assert_eq!((got.rows(), got.cols()), (m, n));
            compare(
                &format!("dense linear m={m} n={n} k={k} bias={with_bias}"),
                &p.down(&got),
                want.data(),
                TOL_REDUCE,
            );
            let (_, bad) = p.up(&values(&mut rng, m * (k + 1), 1.0), m, k + 1);
            assert_err("linear with K + 1 columns", p.gpu.linear(&bad, &gl));
        }
    }
    assert_err("short weights", p.gpu.upload_dense(&[0.5; 5], 2, 3, None));
    assert_err(
        "bias length",
        p.gpu.upload_dense(&[0.5; 6], 2, 3, Some(&[0.0; 3])),
    );
    assert_err(
        "weight not finite in f16",
        p.gpu.upload_dense(&[1e6; 6], 2, 3, None),
    );
}

/// Stored weights a test lends to `upload_linear`.
enum Stored {
    Q4(Q4Matrix),
    F16(Vec<f16>, usize, usize),
    Bf16(Vec<bf16>, usize, usize),
    F32(Vec<f32>, usize, usize),
}

/// A [`LinearSource`] over a map of stored layers.
struct Source(HashMap<String, Stored>);

impl LinearSource for Source {
    fn linear_weights(&self, layer: &str, n: usize, k: usize) -> Result<LinearWeights<'_>> {
        let w = match self.0.get(layer) {
            None => {
                return Err(Error::MissingLayer {
                    layer: layer.to_string(),
                });
            }
            Some(Stored::Q4(q)) => LinearWeights::Q4(q.view()?),
            Some(Stored::F16(d, n, k)) => LinearWeights::dense(DenseData::F16(d), *n, *k)?,
            Some(Stored::Bf16(d, n, k)) => LinearWeights::dense(DenseData::Bf16(d), *n, *k)?,
            Some(Stored::F32(d, n, k)) => LinearWeights::dense(DenseData::F32(d), *n, *k)?,
        };
        if w.n() != n || w.k() != k {
            return Err(Error::ShapeMismatch {
                tensor: format!("{layer}.weight"),
                expected: vec![n, k],
                found: vec![w.n(), w.k()],
            });
        }
        Ok(w)
    }
}

#[test]
fn stored_layers_match_cpu() {
    let Some(p) = pair() else { return };
    let mut rng = common::seeded_rng("stored_layers_match_cpu");
    let mut layers = HashMap::new();
    let mut cases = Vec::new();
    for kind in [Q4Kind::Int4, Q4Kind::Int4Sym, Q4Kind::Nf4] {
        for (n, k, group) in [(1, 64, 32), (24, 192, 64), (200, 384, 128), (37, 96, 32)] {
            let name = format!("{kind}_{n}x{k}_g{group}");
            layers.insert(
                name.clone(),
                Stored::Q4(common::random_q4(&mut rng, kind, n, k, group)),
            );
            cases.push((name, n, k, true));
        }
    }
    for (n, k) in [(24, 40), (3, 7)] {
        let w = values(&mut rng, n * k, 0.5);
        let h = w.iter().map(|&v| f16::from_f32(v)).collect();
        let b = w.iter().map(|&v| bf16::from_f32(v)).collect();
        layers.insert(format!("f16_{n}x{k}"), Stored::F16(h, n, k));
        layers.insert(format!("bf16_{n}x{k}"), Stored::Bf16(b, n, k));
        layers.insert(format!("f32_{n}x{k}"), Stored::F32(w, n, k));
        for dtype in ["f16", "bf16", "f32"] {
            cases.push((format!("{dtype}_{n}x{k}"), n, k, false));
        }
    }
    let source: Arc<dyn LinearSource> = Arc::new(Source(layers));
    let before = p.gpu.cuda_device().memory().weights.current;
    for (name, n, k, q4) in &cases {
        let bias = values(&mut rng, *n, 0.5);
        let cl = p
            .cpu
            .upload_linear(&source, name, *n, *k, Some(&bias))
            .unwrap();
        let gl = p
            .gpu
            .upload_linear(&source, name, *n, *k, Some(&bias))
            .unwrap();
        assert_eq!(matches!(gl, CudaLinear::Q4(_)), *q4, "{name}: layer type");
        assert!(p.gpu.cuda_device().memory().weights.current > before);
        for m in [1, 3, 8, 9, 333] {
            let x = values(&mut rng, m * k, 1.0);
            let (cx, gx) = p.up(&x, m, *k);
            let want = p.cpu.linear(&cx, &cl).unwrap();
            let got = p.gpu.linear(&gx, &gl).unwrap();
            compare(
                &format!("{name}, m = {m}"),
                &p.down(&got),
                want.data(),
                TOL_REDUCE,
            );
        }
        drop(gl);
        assert_eq!(p.gpu.cuda_device().memory().weights.current, before);
        assert_eq!(
            p.gpu.cuda_device().memory().scratch.current,
            0,
            "scratch left after the layer's outputs were dropped"
        );
    }
    assert_err(
        "missing layer",
        p.gpu.upload_linear(&source, "absent", 1, 64, None),
    );
    assert_err(
        "wrong shape",
        p.gpu.upload_linear(&source, &cases[0].0, 2, 64, None),
    );
    assert_err(
        "bias length",
        p.gpu
            .upload_linear(&source, &cases[1].0, 24, 192, Some(&[0.0; 3])),
    );
}

#[test]
fn layer_norm_modulate_matches_cpu() {
    let Some(p) = pair() else { return };
    let mut rng = common::seeded_rng("layer_norm_modulate_matches_cpu");
    for (rows, cols, batch, mean) in [
        (1, 16, 1, 0.0),
        (7, 192, 7, 0.0),
        (334, 48, 2, 0.0),
        (9, 2432, 3, 0.0),
        (5, 2, 1, 0.0),
        (6, 64, 3, 50.0),
    ] {
        let x: Vec<f32> = values(&mut rng, rows * cols, 3.0)
            .into_iter()
            .map(|v| f16::from_f32(v + mean).to_f32())
            .collect();
        let (cx, gx) = p.up(&x, rows, cols);
        let shift = values(&mut rng, batch * cols, 1.0);
        let scale = values(&mut rng, batch * cols, 1.0);
        let (cs, gs) = p.up(&shift, batch, cols);
        let (cc, gc) = p.up(&scale, batch, cols);
        let eps = 1e-6;
        for modulated in [false, true] {
            let (cm, gm) = if modulated {
                (
                    Some(Modulation {
                        shift: &cs,
                        scale: &cc,
                    }),
                    Some(Modulation {
                        shift: &gs,
                        scale: &gc,
                    }),
                )
            } else {
                (None, None)
            };
            let want = p.cpu.layer_norm_modulate(&cx, cm, eps).unwrap();
            let got = p.gpu.layer_norm_modulate(&gx, gm, eps).unwrap();
            compare(
                &format!(
                    "layer_norm [{rows}, {cols}] batch {batch} mean {mean} modulated {modulated}"
                ),
                &p.down(&got),
                want.data(),
                TOL_REDUCE,
            );
        }
    }
    let (_, x) = p.up(&values(&mut rng, 6 * 8, 1.0), 6, 8);
    let (_, s4) = p.up(&values(&mut rng, 4 * 8, 1.0), 4, 8);
    let (_, s2) = p.up(&values(&mut rng, 2 * 8, 1.0), 2, 8);
    let (_, s2w) = p.up(&values(&mut rng, 2 * 6, 1.0), 2, 6);
    let m = |shift, scale| Some(Modulation { shift, scale });
    assert_err(
        "rows not split by batch",
        p.gpu.layer_norm_modulate(&x, m(&s4, &s4), 1e-6),
    );
    assert_err(
        "shift/scale rows differ",
        p.gpu.layer_norm_modulate(&x, m(&s2, &s4), 1e-6),
    );
    assert_err(
        "modulation width",
        p.gpu.layer_norm_modulate(&x, m(&s2w, &s2w), 1e-6),
    );
    assert_err("negative eps", p.gpu.layer_norm_modulate(&x, None, -1.0));
    let (_, odd) = p.up(&values(&mut rng, 3 * 5, 1.0), 3, 5);
    let e = assert_err("odd width", p.gpu.layer_norm_modulate(&odd, None, 1e-6));
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
}

#[test]
fn rms_norm_heads_matches_cpu() {
    let Some(p) = pair() else { return };
    let mut rng = common::seeded_rng("rms_norm_heads_matches_cpu");
    for head_dim in [8, 16, 32, 64, 128] {
        for (rows, heads) in [(1, 1), (7, 3), (333, 2)] {
            let cols = heads * head_dim;
            let x = values(&mut rng, rows * cols, 4.0);
            let w: Vec<f32> = (0..head_dim)
                .map(|_| f16::from_f32(1.0 + rng.random_range(-0.2f32..0.2)).to_f32())
                .collect();
            let (mut cx, mut gx) = p.up(&x, rows, cols);
            let (cw, gw) = p.up(&w, 1, head_dim);
            p.cpu.rms_norm_heads(&mut cx, &cw, 1e-6).unwrap();
            p.gpu.rms_norm_heads(&mut gx, &gw, 1e-6).unwrap();
            compare(
                &format!("rms_norm rows {rows} heads {heads} head_dim {head_dim}"),
                &p.down(&gx),
                cx.data(),
                TOL_REDUCE,
            );
        }
    }
    let (_, mut x) = p.up(&values(&mut rng, 3 * 24, 1.0), 3, 24);
    let (_, w2) = p.up(&[1.0; 16], 2, 8);
    let (_, w5) = p.up(&[1.0; 5], 1, 5);
    assert_err(
        "weight of two rows",
        p.gpu.rms_norm_heads(&mut x, &w2, 1e-6),
    );
    assert_err(
        "width not dividing",
        p.gpu.rms_norm_heads(&mut x, &w5, 1e-6),
    );
    let (_, mut wide) = p.up(&values(&mut rng, 2 * 256, 1.0), 2, 256);
    let (_, w256) = p.up(&[1.0; 256], 1, 256);
    let e = assert_err(
        "256-wide heads",
        p.gpu.rms_norm_heads(&mut wide, &w256, 1e-6),
    );
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
}

#[test]
fn residuals_match_cpu() {
    let Some(p) = pair() else { return };
    let mut rng = common::seeded_rng("residuals_match_cpu");
    for (rows, cols, batch) in [(1, 1, 1), (7, 16, 7), (333, 192, 3), (334, 5, 2)] {
        let x = values(&mut rng, rows * cols, 4.0);
        let y = values(&mut rng, rows * cols, 4.0);
        let g = values(&mut rng, batch * cols, 1.5);
        let (cy, gy) = p.up(&y, rows, cols);
        let (cg, gg) = p.up(&g, batch, cols);
        for gated in [false, true] {
            let (mut cx, mut gx) = p.up(&x, rows, cols);
            p.cpu
                .gated_residual(&mut cx, gated.then_some(&cg), &cy)
                .unwrap();
            p.gpu
                .gated_residual(&mut gx, gated.then_some(&gg), &gy)
                .unwrap();
            compare(
                &format!("gated_residual [{rows}, {cols}] batch {batch} gated {gated}"),
                &p.down(&gx),
                cx.data(),
                TOL_ELEMENTWISE,
            );
        }
        let (mut cx, mut gx) = p.up(&x, rows, cols);
        p.cpu.add_assign(&mut cx, &cy).unwrap();
        p.gpu.add_assign(&mut gx, &gy).unwrap();
        compare(
            &format!("add_assign [{rows}, {cols}]"),
            &p.down(&gx),
            cx.data(),
            TOL_ELEMENTWISE,
        );
    }
    let (_, mut x) = p.up(&values(&mut rng, 6 * 4, 1.0), 6, 4);
    let (_, y5) = p.up(&values(&mut rng, 5 * 4, 1.0), 5, 4);
    let (_, y) = p.up(&values(&mut rng, 6 * 4, 1.0), 6, 4);
    let (_, g4) = p.up(&values(&mut rng, 4 * 4, 1.0), 4, 4);
    let (_, g3) = p.up(&values(&mut rng, 2 * 3, 1.0), 2, 3);
    assert_err("update shape", p.gpu.gated_residual(&mut x, None, &y5));
    assert_err(
        "gate rows not splitting",
        p.gpu.gated_residual(&mut x, Some(&g4), &y),
    );
    assert_err("gate width", p.gpu.gated_residual(&mut x, Some(&g3), &y));
    assert_err("add_assign shape", p.gpu.add_assign(&mut x, &y5));
}

#[test]
fn activations_match_cpu() {
    let Some(p) = pair() else { return };
    let mut rng = common::seeded_rng("activations_match_cpu");
    for (rows, cols) in [(1, 1), (7, 16), (333, 192), (2, 2432)] {
        let x = values(&mut rng, rows * cols, 8.0);
        let (mut cx, mut gx) = p.up(&x, rows, cols);
        p.cpu.silu(&mut cx).unwrap();
        p.gpu.silu(&mut gx).unwrap();
        compare(
            &format!("silu [{rows}, {cols}]"),
            &p.down(&gx),
            cx.data(),
            TOL_ELEMENTWISE,
        );
        let (mut cx, mut gx) = p.up(&x, rows, cols);
        p.cpu.gelu_tanh(&mut cx).unwrap();
        p.gpu.gelu_tanh(&mut gx).unwrap();
        compare(
            &format!("gelu_tanh [{rows}, {cols}]"),
            &p.down(&gx),
            cx.data(),
            TOL_ELEMENTWISE,
        );
    }
    // Activations take any shape; a tensor of another device handle is the bad input.
    let other = common::gpu().expect("second handle");
    let mut foreign = other.upload(&[1.0; 4], 2, 2).unwrap();
    assert_err("foreign tensor", p.gpu.silu(&mut foreign));
    assert_err("foreign tensor", p.gpu.gelu_tanh(&mut foreign));
}

#[test]
fn attention_matches_cpu() {
    let Some(p) = pair() else { return };
    let mut rng = common::seeded_rng("attention_matches_cpu");
    for head_dim in [8, 16, 32, 64, 128] {
        for (batch, seq, heads) in [(1, 1, 1), (1, 7, 3), (2, 7, 1), (2, 333, 2)] {
            let (rows, cols) = (batch * seq, heads * head_dim);
            let q = values(&mut rng, rows * cols, 2.0);
            let k = values(&mut rng, rows * cols, 2.0);
            let v = values(&mut rng, rows * cols, 2.0);
            let (cq, gq) = p.up(&q, rows, cols);
            let (ck, gk) = p.up(&k, rows, cols);
            let (cv, gv) = p.up(&v, rows, cols);
            let want = p.cpu.attention(&cq, &ck, &cv, batch, heads).unwrap();
            let got = p.gpu.attention(&gq, &gk, &gv, batch, heads).unwrap();
            assert_eq!((got.rows(), got.cols()), (rows, cols));
            compare(
                &format!("attention batch {batch} seq {seq} heads {heads} head_dim {head_dim}"),
                &p.down(&got),
                want.data(),
                TOL_REDUCE,
            );
        }
    }
    let (_, a) = p.up(&values(&mut rng, 6 * 24, 1.0), 6, 24);
    let (_, b) = p.up(&values(&mut rng, 6 * 16, 1.0), 6, 16);
    let (_, c) = p.up(&values(&mut rng, 6 * 16, 1.0), 6, 16);
    let e = assert_err("head_dim 12", p.gpu.attention(&a, &a, &a, 1, 2));
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    assert_err("k shape", p.gpu.attention(&b, &a, &c, 1, 2));
    assert_err("rows not split by batch", p.gpu.attention(&b, &b, &c, 4, 2));
    assert_err("heads not dividing", p.gpu.attention(&b, &b, &c, 1, 3));
    assert_err("zero heads", p.gpu.attention(&b, &b, &c, 1, 0));
}

#[test]
fn image_ops_match_cpu() {
    let Some(p) = pair() else { return };
    let mut rng = common::seeded_rng("image_ops_match_cpu");
    // (batch, height, width, in channels, out channels, kernel)
    for (batch, height, width, cin, cout, kernel) in [
        (1, 1, 1, 3, 5, 3),
        (2, 7, 5, 16, 32, 3),
        (1, 9, 4, 32, 8, 1),
        (1, 33, 17, 8, 3, 3),
    ] {
        let image = ImageShape {
            batch,
            height,
            width,
        };
        let pixels = batch * height * width;
        let k = cin * kernel * kernel;
        let x = values(&mut rng, pixels * cin, 2.0);
        let w = values(&mut rng, cout * k, 0.5);
        let bias = values(&mut rng, cout, 0.5);
        let (cx, gx) = p.up(&x, pixels, cin);
        let cl = p.cpu.upload_dense(&w, cout, k, Some(&bias)).unwrap();
        let gl = p.gpu.upload_dense(&w, cout, k, Some(&bias)).unwrap();
        let want = p.cpu.conv2d(&cx, &cl, image, kernel).unwrap();
        let got = p.gpu.conv2d(&gx, &gl, image, kernel).unwrap();
        let what = format!("conv2d {image} {cin}->{cout} k{kernel}");
        compare(&what, &p.down(&got), want.data(), TOL_REDUCE);

        let up_want = p.cpu.upsample_nearest2x(&cx, image).unwrap();
        let up_got = p.gpu.upsample_nearest2x(&gx, image).unwrap();
        compare("upsample", &p.down(&up_got), up_want.data(), 0.0);

        let groups = if cin % 4 == 0 { 4 } else { 1 };
        let weight = values(&mut rng, cin, 1.0);
        let shift = values(&mut rng, cin, 1.0);
        let (cw, gw) = p.up(&weight, 1, cin);
        let (cb, gb) = p.up(&shift, 1, cin);
        for silu in [false, true] {
            let cn = GroupNorm {
                groups,
                weight: &cw,
                bias: &cb,
                eps: 1e-6,
            };
            let gn = GroupNorm {
                groups,
                weight: &gw,
                bias: &gb,
                eps: 1e-6,
            };
            let want = p.cpu.group_norm(&cx, batch, cn, silu).unwrap();
            let got = p.gpu.group_norm(&gx, batch, gn, silu).unwrap();
            compare(
                &format!("group_norm {image} {cin} channels, {groups} groups, silu {silu}"),
                &p.down(&got),
                want.data(),
                TOL_REDUCE,
            );
        }
    }
    let (_, gx) = p.up(&values(&mut rng, 4 * 3, 1.0), 4, 3);
    let gl = p.gpu.upload_dense(&[0.0; 4 * 27], 4, 27, None).unwrap();
    let square = ImageShape {
        batch: 1,
        height: 2,
        width: 2,
    };
    assert_err("even kernel", p.gpu.conv2d(&gx, &gl, square, 2));
    let tall = ImageShape {
        height: 3,
        ..square
    };
    assert_err("rows not the image", p.gpu.conv2d(&gx, &gl, tall, 3));
    assert_err("upsample rows", p.gpu.upsample_nearest2x(&gx, tall));
}

#[test]
fn token_copies_match_cpu() {
    let Some(p) = pair() else { return };
    let mut rng = common::seeded_rng("token_copies_match_cpu");
    for (batch, na, nb, d) in [
        (1, 1, 1, 1),
        (2, 7, 5, 16),
        (3, 333, 4, 3),
        (2, 16, 77, 192),
    ] {
        let a = values(&mut rng, batch * na * d, 10.0);
        let b = values(&mut rng, batch * nb * d, 10.0);
        let (ca, ga) = p.up(&a, batch * na, d);
        let (cb, gb) = p.up(&b, batch * nb, d);
        let want = p.cpu.concat_tokens(&ca, &cb, batch).unwrap();
        let got = p.gpu.concat_tokens(&ga, &gb, batch).unwrap();
        assert_eq!(
            p.down(&got),
            want.data(),
            "concat batch {batch} {na}+{nb} x {d}"
        );
        let seq = na + nb;
        for first in [na, 1, seq - 1, rng.random_range(1..seq.max(2))] {
            if first == 0 || first >= seq {
                continue;
            }
            let (wa, wb) = p.cpu.split_tokens(&want, batch, first).unwrap();
            let (x, y) = p.gpu.split_tokens(&got, batch, first).unwrap();
            assert_eq!(p.down(&x), wa.data(), "split first part, first = {first}");
            assert_eq!(p.down(&y), wb.data(), "split second part, first = {first}");
        }
        let (x, y) = p.gpu.split_tokens(&got, batch, na).unwrap();
        assert_eq!(
            (p.down(&x), p.down(&y)),
            (a.clone(), b.clone()),
            "split of concat"
        );
    }
    for (rows, chunks, d) in [(1, 1, 5), (2, 6, 16), (3, 9, 64), (7, 2, 3)] {
        let x = values(&mut rng, rows * chunks * d, 10.0);
        let (cx, gx) = p.up(&x, rows, chunks * d);
        for index in 0..chunks {
            let want = p.cpu.column_chunk(&cx, chunks, index).unwrap();
            let got = p.gpu.column_chunk(&gx, chunks, index).unwrap();
            assert_eq!((got.rows(), got.cols()), (rows, d));
            assert_eq!(
                p.down(&got),
                want.data(),
                "chunk {index} of {chunks}, [{rows}, {d}]"
            );
        }
    }
    let (_, a) = p.up(&values(&mut rng, 4 * 8, 1.0), 4, 8);
    let (_, b) = p.up(&values(&mut rng, 3 * 8, 1.0), 3, 8);
    let (_, w) = p.up(&values(&mut rng, 4 * 6, 1.0), 4, 6);
    assert_err("concat widths", p.gpu.concat_tokens(&a, &w, 1));
    assert_err("concat rows not split", p.gpu.concat_tokens(&a, &b, 2));
    assert_err("split past the item", p.gpu.split_tokens(&a, 2, 3));
    assert_err("split with an empty part", p.gpu.split_tokens(&a, 2, 0));
    assert_err("split with an empty part", p.gpu.split_tokens(&a, 2, 2));
    assert_err("split rows not split", p.gpu.split_tokens(&b, 2, 1));
    assert_err("chunk index", p.gpu.column_chunk(&a, 2, 2));
    assert_err("chunks not dividing", p.gpu.column_chunk(&a, 3, 0));
    assert_err("zero chunks", p.gpu.column_chunk(&a, 0, 0));
}

#[test]
fn foreign_tensors_are_refused() {
    let Some(p) = pair() else { return };
    let other = common::gpu().expect("second handle");
    let mine = p.gpu.upload(&[1.0; 64], 4, 16).unwrap();
    let theirs = other.upload(&[1.0; 64], 4, 16).unwrap();
    let layer = p.gpu.upload_dense(&[0.5; 16 * 8], 8, 16, None).unwrap();
    assert_err("linear", p.gpu.linear(&theirs, &layer));
    assert_err("layer_norm", p.gpu.layer_norm_modulate(&theirs, None, 1e-6));
    assert_err("attention", p.gpu.attention(&mine, &theirs, &mine, 1, 2));
    assert_err("concat", p.gpu.concat_tokens(&mine, &theirs, 1));
    assert_err("column_chunk", p.gpu.column_chunk(&theirs, 2, 0));
    let mut m2 = p.gpu.upload(&[1.0; 64], 4, 16).unwrap();
    assert_err("add_assign", p.gpu.add_assign(&mut m2, &theirs));
    assert_err("download", p.gpu.download(&theirs));
}
