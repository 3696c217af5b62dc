//! The `Backend` trait on the CPU: every op of `CpuBackend` against an f64 reference on
//! fresh random inputs of awkward shapes, shape errors instead of panics, `Device`
//! parsing and the CUDA error of a build without it, and the MMDiT engine run through
//! a wrapping backend that counts host transfers (the forward must stay on the
//! backend between its first uploads and its one download).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hiprune::Error;
use hiprune::backend::{
    Activation, Backend, CpuBackend, CpuLinear, CpuTensor, Device, GroupNorm, ImageShape,
    LinearLayer, LinearSource, Modulation,
};
use hiprune::model::{Mmdit, MmditInputs, PruneSpec, Tensor, TensorFile};
use hiprune::quant::{DenseData, LinearWeights};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const EPS: f32 = 1e-6;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mmdit")
        .join(name)
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn tensor(rng: &mut StdRng, rows: usize, cols: usize, scale: f32) -> CpuTensor {
    CpuTensor::from_vec(random(rng, rows * cols, scale), rows, cols).unwrap()
}

/// Largest |a - b| over max(1, max |b|).
fn max_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
        / scale
}

fn layer_norm_ref(x: &[f32], cols: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let inv = 1.0 / (var + EPS as f64).sqrt();
        out.extend(row.iter().map(|&v| (v as f64 - mean) * inv));
    }
    out
}

#[test]
fn layer_norm_modulate_matches_reference() {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..12 {
        let batch = rng.random_range(1..4usize);
        let per = rng.random_range(1..20usize);
        let cols = rng.random_range(1..70usize);
        let x = tensor(&mut rng, batch * per, cols, 3.0);
        let shift = tensor(&mut rng, batch, cols, 1.0);
        let scale = tensor(&mut rng, batch, cols, 1.0);

        let plain = be.layer_norm_modulate(&x, None, EPS).unwrap();
        let want = layer_norm_ref(x.data(), cols);
        assert!(max_err(plain.data(), &want) < 1e-5);

        let m = Modulation {
            shift: &shift,
            scale: &scale,
        };
        let got = be.layer_norm_modulate(&x, Some(m), EPS).unwrap();
        assert_eq!((got.rows(), got.cols()), (batch * per, cols));
        let want: Vec<f64> = want
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let (r, c) = (i / cols, i % cols);
                let b = r / per;
                v * (1.0 + scale.data()[b * cols + c] as f64) + shift.data()[b * cols + c] as f64
            })
            .collect();
        assert!(max_err(got.data(), &want) < 1e-5);
    }
}

#[test]
fn rms_norm_gates_and_activations_match_reference() {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(12);
    for _ in 0..12 {
        let head_dim = rng.random_range(1..40usize);
        let heads = rng.random_range(1..5usize);
        let batch = rng.random_range(1..4usize);
        let per = rng.random_range(1..9usize);
        let rows = batch * per;
        let cols = heads * head_dim;

        let x0 = tensor(&mut rng, rows, cols, 2.0);
        let w = tensor(&mut rng, 1, head_dim, 1.5);
        let mut x = x0.clone();
        be.rms_norm_heads(&mut x, &w, EPS).unwrap();
        let mut want = Vec::new();
        for v in x0.data().chunks(head_dim) {
            let ms = v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / head_dim as f64;
            let inv = 1.0 / (ms + EPS as f64).sqrt();
            want.extend(
                v.iter()
                    .zip(w.data())
                    .map(|(&a, &g)| a as f64 * inv * g as f64),
            );
        }
        assert!(max_err(x.data(), &want) < 1e-5);

        let y = tensor(&mut rng, rows, cols, 2.0);
        let gate = tensor(&mut rng, batch, cols, 1.0);
        let mut r = x0.clone();
        be.gated_residual(&mut r, Some(&gate), &y).unwrap();
        let want: Vec<f64> = (0..rows * cols)
            .map(|i| {
                let b = i / cols / per;
                x0.data()[i] as f64 + gate.data()[b * cols + i % cols] as f64 * y.data()[i] as f64
            })
            .collect();
        assert!(max_err(r.data(), &want) < 1e-6);

        let mut r = x0.clone();
        be.gated_residual(&mut r, None, &y).unwrap();
        let mut s = x0.clone();
        be.add_assign(&mut s, &y).unwrap();
        let want: Vec<f64> = (0..rows * cols)
            .map(|i| x0.data()[i] as f64 + y.data()[i] as f64)
            .collect();
        assert!(max_err(r.data(), &want) < 1e-6);
        assert_eq!(r, s);

        let mut a = x0.clone();
        be.silu(&mut a).unwrap();
        let want: Vec<f64> = x0
            .data()
            .iter()
            .map(|&v| v as f64 / (1.0 + (-(v as f64)).exp()))
            .collect();
        assert!(max_err(a.data(), &want) < 1e-6);
        let mut g = x0.clone();
        be.gelu_tanh(&mut g).unwrap();
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let want: Vec<f64> = x0
            .data()
            .iter()
            .map(|&v| {
                let u = v as f64;
                0.5 * u * (1.0 + (c * (u + 0.044715 * u * u * u)).tanh())
            })
            .collect();
        assert!(max_err(g.data(), &want) < 1e-6);
    }
}

#[test]
fn joint_attention_matches_reference() {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(13);
    for _ in 0..8 {
        let batch = rng.random_range(1..3usize);
        let heads = rng.random_range(1..4usize);
        let head_dim = rng.random_range(1..20usize);
        let (n_img, n_ctx) = (rng.random_range(1..13usize), rng.random_range(1..7usize));
        let d = heads * head_dim;
        let parts: Vec<CpuTensor> = (0..6)
            .map(|j| {
                let rows = batch * if j % 2 == 0 { n_img } else { n_ctx };
                tensor(&mut rng, rows, d, 1.5)
            })
            .collect();
        let q = be.concat_tokens(&parts[0], &parts[1], batch).unwrap();
        let k = be.concat_tokens(&parts[2], &parts[3], batch).unwrap();
        let v = be.concat_tokens(&parts[4], &parts[5], batch).unwrap();
        let seq = n_img + n_ctx;
        assert_eq!((q.rows(), q.cols()), (batch * seq, d));

        // The split undoes the concatenation exactly.
        let (a, b) = be.split_tokens(&q, batch, n_img).unwrap();
        assert_eq!((&a, &b), (&parts[0], &parts[1]));

        let o = be.attention(&q, &k, &v, batch, heads).unwrap();
        let mut want = vec![0.0f64; batch * seq * d];
        let at = |t: &CpuTensor, b: usize, i: usize, h: usize, c: usize| {
            t.data()[(b * seq + i) * d + h * head_dim + c] as f64
        };
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..seq {
                    let logits: Vec<f64> = (0..seq)
                        .map(|j| {
                            (0..head_dim)
                                .map(|c| at(&q, b, i, h, c) * at(&k, b, j, h, c))
                                .sum::<f64>()
                                / (head_dim as f64).sqrt()
                        })
                        .collect();
                    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..head_dim {
                        want[(b * seq + i) * d + h * head_dim + c] =
                            (0..seq).map(|j| e[j] / sum * at(&v, b, j, h, c)).sum();
                    }
                }
            }
        }
        assert!(max_err(o.data(), &want) < 1e-5);
    }
}

#[test]
fn column_chunks_and_transfers_are_exact() {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(14);
    for _ in 0..10 {
        let rows = rng.random_range(1..6usize);
        let d = rng.random_range(1..30usize);
        let nch = rng.random_range(1..10usize);
        let host = random(&mut rng, rows * nch * d, 4.0);
        let m = be.upload(&host, rows, nch * d).unwrap();
        assert_eq!(be.download(&m).unwrap(), host);
        for j in 0..nch {
            let c = be.column_chunk(&m, nch, j).unwrap();
            assert_eq!((c.rows(), c.cols()), (rows, d));
            for r in 0..rows {
                assert_eq!(
                    &c.data()[r * d..(r + 1) * d],
                    &host[(r * nch + j) * d..][..d]
                );
            }
        }
    }
}

/// A host weight store lending one layer `w` under the name `lin`.
struct OneLayer {
    w: Vec<f32>,
    n: usize,
    k: usize,
}

impl LinearSource for OneLayer {
    fn linear_weights(
        &self,
        layer: &str,
        n: usize,
        k: usize,
    ) -> hiprune::Result<LinearWeights<'_>> {
        if layer != "lin" {
            return Err(Error::MissingTensor {
                tensor: format!("{layer}.weight"),
            });
        }
        if (n, k) != (self.n, self.k) {
            return Err(Error::ShapeMismatch {
                tensor: "lin.weight".into(),
                expected: vec![n, k],
                found: vec![self.n, self.k],
            });
        }
        LinearWeights::dense(DenseData::F32(&self.w), n, k)
    }
}

#[test]
fn uploaded_linears_match_reference() {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(15);
    for _ in 0..10 {
        let (m, n, k) = (
            rng.random_range(1..40usize),
            rng.random_range(1..50usize),
            rng.random_range(1..60usize),
        );
        let w = random(&mut rng, n * k, 1.0);
        let bias = random(&mut rng, n, 1.0);
        let x = tensor(&mut rng, m, k, 1.0);
        let mut want = vec![0.0f64; m * n];
        for r in 0..m {
            for o in 0..n {
                want[r * n + o] = bias[o] as f64
                    + (0..k)
                        .map(|i| x.data()[r * k + i] as f64 * w[o * k + i] as f64)
                        .sum::<f64>();
            }
        }
        let dense = be.upload_dense(&w, n, k, Some(&bias)).unwrap();
        let source: Arc<dyn LinearSource> = Arc::new(OneLayer { w, n, k });
        let shared = be.upload_linear(&source, "lin", n, k, Some(&bias)).unwrap();
        assert_eq!((shared.n(), shared.k()), (n, k));
        let a = be.linear(&x, &dense).unwrap();
        let b = be.linear(&x, &shared).unwrap();
        assert_eq!(a, b, "owned and shared weights give different results");
        assert!(max_err(a.data(), &want) < 1e-5);

        // Errors at upload name the layer; a wrong input width is an error.
        assert!(matches!(
            be.upload_linear(&source, "other", n, k, None),
            Err(Error::MissingTensor { .. })
        ));
        assert!(matches!(
            be.upload_linear(&source, "lin", n + 1, k, None),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(be.upload_dense(&[1.0; 3], n, k + 3, None).is_err());
        assert!(
            be.upload_linear(&source, "lin", n, k, Some(&[0.0; 1][..0]))
                .is_err()
        );
        let wide = tensor(&mut rng, m, k + 1, 1.0);
        assert!(be.linear(&wide, &shared).is_err());
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let be = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(16);
    let x = tensor(&mut rng, 7, 6, 1.0);
    let y = tensor(&mut rng, 6, 6, 1.0);
    let g2 = tensor(&mut rng, 2, 6, 1.0);
    let g1 = tensor(&mut rng, 1, 5, 1.0);
    assert!(CpuTensor::from_vec(vec![0.0; 5], 2, 3).is_err());
    assert!(be.upload(&[0.0; 5], 2, 3).is_err());
    assert!(be.upload(&[], usize::MAX, 2).is_err());
    // 7 rows do not split into 2 items.
    let m = Modulation {
        shift: &g2,
        scale: &g2,
    };
    assert!(be.layer_norm_modulate(&x, Some(m), EPS).is_err());
    let m = Modulation {
        shift: &g2,
        scale: &g1,
    };
    assert!(be.layer_norm_modulate(&y, Some(m), EPS).is_err());
    let mut x2 = x.clone();
    assert!(be.gated_residual(&mut x2, Some(&g2), &x).is_err());
    assert!(be.gated_residual(&mut x2, None, &y).is_err());
    assert!(be.add_assign(&mut x2, &y).is_err());
    assert!(be.rms_norm_heads(&mut x2, &g1, EPS).is_err());
    assert!(be.rms_norm_heads(&mut x2, &g2, EPS).is_err());
    assert_eq!(x2, x, "a rejected op changed its input");
    assert!(be.attention(&x, &x, &y, 1, 2).is_err());
    assert!(be.attention(&x, &x, &x, 2, 2).is_err());
    assert!(be.attention(&x, &x, &x, 1, 4).is_err());
    assert!(be.attention(&x, &x, &x, 1, 0).is_err());
    assert!(be.concat_tokens(&x, &g1, 1).is_err());
    assert!(be.concat_tokens(&x, &y, 2).is_err());
    assert!(be.split_tokens(&y, 2, 4).is_err());
    assert!(be.split_tokens(&x, 0, 0).is_err());
    assert!(be.column_chunk(&x, 4, 0).is_err());
    assert!(be.column_chunk(&x, 3, 3).is_err());
    assert!(be.column_chunk(&x, 0, 0).is_err());
}

#[test]
fn devices_parse_and_cuda_without_the_feature_is_a_clear_error() {
    assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
    assert_eq!(Device::parse("CUDA").unwrap(), Device::Cuda(0));
    assert_eq!(Device::parse(" cuda:3 ").unwrap(), Device::Cuda(3));
    for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
        assert!(Device::parse(bad).is_err(), "`{bad}` parsed");
    }
    assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    assert_eq!(
        Device::parse(&Device::Cuda(5).to_string()).unwrap(),
        Device::Cuda(5)
    );
    assert!(Device::Cpu.ensure_compiled().is_ok());
    assert_eq!(CpuBackend::open(Device::Cpu).unwrap().device(), Device::Cpu);

    // The CPU model refuses a CUDA device, before reading the model.
    let err = Mmdit::<CpuBackend>::load_on(fixture("no-such-model"), Device::Cuda(1)).unwrap_err();
    if cfg!(feature = "cuda") {
        assert!(Device::Cuda(0).ensure_compiled().is_ok());
    } else {
        assert!(matches!(err, Error::BackendNotCompiled { .. }), "{err}");
        assert!(err.to_string().contains("--features cuda"), "{err}");
        assert!(matches!(
            Device::Cuda(0).ensure_compiled(),
            Err(Error::BackendNotCompiled { .. })
        ));
    }
}

/// [`CpuBackend`] behind a wrapper that counts host transfers.
#[derive(Debug, Default)]
struct Counting {
    inner: CpuBackend,
    uploads: AtomicUsize,
    downloads: AtomicUsize,
    linears: AtomicUsize,
}

impl Backend for Counting {
    type Tensor = CpuTensor;
    type Linear = CpuLinear;

    fn open(device: Device) -> hiprune::Result<Self> {
        Ok(Counting {
            inner: CpuBackend::open(device)?,
            ..Counting::default()
        })
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> hiprune::Result<CpuTensor> {
        self.uploads.fetch_add(1, Ordering::Relaxed);
        self.inner.upload(data, rows, cols)
    }
    fn download(&self, x: &CpuTensor) -> hiprune::Result<Vec<f32>> {
        self.downloads.fetch_add(1, Ordering::Relaxed);
        self.inner.download(x)
    }
    fn upload_linear(
        &self,
        source: &Arc<dyn LinearSource>,
        layer: &str,
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> hiprune::Result<CpuLinear> {
        self.linears.fetch_add(1, Ordering::Relaxed);
        self.inner.upload_linear(source, layer, n, k, bias)
    }
    fn upload_dense(
        &self,
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> hiprune::Result<CpuLinear> {
        self.linears.fetch_add(1, Ordering::Relaxed);
        self.inner.upload_dense(w, n, k, bias)
    }
    fn linear(&self, x: &CpuTensor, w: &CpuLinear) -> hiprune::Result<CpuTensor> {
        self.inner.linear(x, w)
    }
    fn layer_norm_modulate(
        &self,
        x: &CpuTensor,
        modulation: Option<Modulation<'_, CpuTensor>>,
        eps: f32,
    ) -> hiprune::Result<CpuTensor> {
        self.inner.layer_norm_modulate(x, modulation, eps)
    }
    fn rms_norm_heads(&self, x: &mut CpuTensor, w: &CpuTensor, eps: f32) -> hiprune::Result<()> {
        self.inner.rms_norm_heads(x, w, eps)
    }
    fn gated_residual(
        &self,
        x: &mut CpuTensor,
        gate: Option<&CpuTensor>,
        y: &CpuTensor,
    ) -> hiprune::Result<()> {
        self.inner.gated_residual(x, gate, y)
    }
    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> hiprune::Result<()> {
        self.inner.add_assign(x, y)
    }
    fn silu(&self, x: &mut CpuTensor) -> hiprune::Result<()> {
        self.inner.silu(x)
    }
    fn gelu_tanh(&self, x: &mut CpuTensor) -> hiprune::Result<()> {
        self.inner.gelu_tanh(x)
    }
    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        batch: usize,
        heads: usize,
    ) -> hiprune::Result<CpuTensor> {
        self.inner.attention(q, k, v, batch, heads)
    }
    fn concat_tokens(
        &self,
        a: &CpuTensor,
        b: &CpuTensor,
        batch: usize,
    ) -> hiprune::Result<CpuTensor> {
        self.inner.concat_tokens(a, b, batch)
    }
    fn split_tokens(
        &self,
        x: &CpuTensor,
        batch: usize,
        first: usize,
    ) -> hiprune::Result<(CpuTensor, CpuTensor)> {
        self.inner.split_tokens(x, batch, first)
    }
    fn column_chunk(
        &self,
        x: &CpuTensor,
        chunks: usize,
        index: usize,
    ) -> hiprune::Result<CpuTensor> {
        self.inner.column_chunk(x, chunks, index)
    }
    fn conv2d(
        &self,
        x: &CpuTensor,
        w: &CpuLinear,
        image: ImageShape,
        kernel: usize,
    ) -> hiprune::Result<CpuTensor> {
        self.inner.conv2d(x, w, image, kernel)
    }
    fn group_norm(
        &self,
        x: &CpuTensor,
        batch: usize,
        norm: GroupNorm<'_, CpuTensor>,
        silu: bool,
    ) -> hiprune::Result<CpuTensor> {
        self.inner.group_norm(x, batch, norm, silu)
    }
    fn upsample_nearest2x(&self, x: &CpuTensor, image: ImageShape) -> hiprune::Result<CpuTensor> {
        self.inner.upsample_nearest2x(x, image)
    }
}

struct Inputs(TensorFile);

impl Inputs {
    fn open(folder: &str) -> Inputs {
        Inputs(TensorFile::open(fixture(folder).join("inputs.safetensors")).unwrap())
    }

    fn get(&self) -> MmditInputs<'_> {
        MmditInputs {
            hidden_states: self.0.get("hidden_states").unwrap(),
            encoder_hidden_states: self.0.get("encoder_hidden_states").unwrap(),
            pooled_projections: self.0.get("pooled_projections").unwrap(),
            timestep: self.0.get("timestep").unwrap(),
        }
    }
}

fn run<B: Backend>(model: &Mmdit<B>, inputs: &Inputs) -> Tensor {
    model.forward(&inputs.get()).unwrap()
}

#[test]
fn the_engine_stays_on_the_backend_and_matches_the_cpu_model() {
    for folder in ["sd3", "sd35", "mmditx"] {
        let inputs = Inputs::open(folder);
        let cpu = Mmdit::load(fixture(folder)).unwrap();
        let on_cpu: Mmdit = Mmdit::load_on(fixture(folder), Device::Cpu).unwrap();
        let counted = Mmdit::<Counting>::load_on(fixture(folder), Device::Cpu).unwrap();
        let be = counted.backend();
        let linears = be.linears.load(Ordering::Relaxed);
        assert!(linears > 0);
        let (up0, down0) = (
            be.uploads.load(Ordering::Relaxed),
            be.downloads.load(Ordering::Relaxed),
        );

        let want = run(&cpu, &inputs);
        assert_eq!(
            run(&on_cpu, &inputs),
            want,
            "{folder}: load_on(cpu) differs"
        );
        assert_eq!(
            run(&counted, &inputs),
            want,
            "{folder}: wrapped backend differs"
        );
        // Five uploads (patches, the positional crop, timestep embedding, pooled and
        // prompt embeddings) and one download per forward, nothing in between.
        assert_eq!(be.uploads.load(Ordering::Relaxed) - up0, 5, "{folder}");
        assert_eq!(be.downloads.load(Ordering::Relaxed) - down0, 1, "{folder}");
        assert_eq!(be.linears.load(Ordering::Relaxed), linears);
    }
}

#[test]
fn set_prune_reuses_uploaded_layers_and_round_trips_exactly() {
    let inputs = Inputs::open("sd35");
    let mut model = Mmdit::<Counting>::load_on(fixture("sd35"), Device::Cpu).unwrap();
    let full = run(&model, &inputs);
    let uploaded = model.backend().linears.load(Ordering::Relaxed);

    // Removing a block needs no new layer; restoring it re-uploads only that block's.
    let mut spec = PruneSpec::none();
    spec.removed_blocks.insert(1);
    model.set_prune(spec).unwrap();
    assert_eq!(model.backend().linears.load(Ordering::Relaxed), uploaded);
    let pruned = run(&model, &inputs);
    assert_ne!(pruned, full);
    model.set_prune(PruneSpec::none()).unwrap();
    let again = model.backend().linears.load(Ordering::Relaxed) - uploaded;
    assert!(
        again > 0 && again < uploaded,
        "{again} of {uploaded} re-uploaded"
    );
    assert_eq!(run(&model, &inputs), full);

    // An invalid plan leaves the model as it was.
    let mut bad = PruneSpec::none();
    bad.removed_blocks.insert(99);
    assert!(model.set_prune(bad).is_err());
    assert_eq!(model.prune_spec(), &PruneSpec::none());
    assert_eq!(run(&model, &inputs), full);
}
