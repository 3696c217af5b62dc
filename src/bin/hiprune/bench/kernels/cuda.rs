//! `hiprune bench kernels --backend cuda`: the 4-bit kernels against cuBLAS f16 on
//! the device, timed with CUDA events on the device's stream, and the device-to-device
//! copy bandwidth measured in the same run.

use std::time::Instant;

use half::f16;
use hiprune::backend::cuda::{
    CudaDenseLinear, CudaDevice, CudaQ4Linear, GEMV_MAX_M, Q4Kernel, StreamTimer,
    measure_copy_bandwidth,
};
use hiprune::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Cell, KernelArgs, Q4Data, Shape, Variant};
use crate::bench::report::{Measurement, quantile};

/// Largest buffer of the copy-bandwidth measurement.
const COPY_BYTES: usize = 1 << 30;

/// Timed copies of the copy-bandwidth measurement.
const COPY_RUNS: usize = 20;

/// Device time one timed run should at least take: short kernels are launched back to
/// back this long between two events, so event resolution and launch gaps do not
/// count.
const MIN_RUN_S: f64 = 200e-6;

/// Most launches in one timed run.
const MAX_BATCH: usize = 256;

/// Times `f(i)` (launch number `i`, for rotating over weight copies) with events on
/// `device`'s stream: one warm-up launch, one launch alone to size the batch, then runs
/// of `batch` back-to-back launches until `seconds` of wall time are spent (at least 3,
/// at most 200 runs). Returns the sorted per-launch times and the batch.
fn time_launches(
    device: &CudaDevice,
    seconds: f64,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<(Vec<f64>, usize)> {
    let timer = StreamTimer::new(device)?;
    f(0)?;
    device.synchronize()?;
    timer.start()?;
    f(1)?;
    timer.stop()?;
    let single = timer.elapsed_s()?.max(1e-7);
    let batch = ((MIN_RUN_S / single).ceil() as usize).clamp(1, MAX_BATCH);
    let mut launch = 2;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (times.len() < 200 && start.elapsed().as_secs_f64() < seconds) {
        timer.start()?;
        for _ in 0..batch {
            f(launch)?;
            launch += 1;
        }
        timer.stop()?;
        times.push(timer.elapsed_s()? / batch as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok((times, batch))
}

/// `len` random f16 values in `[-scale, scale)`.
fn random_f16(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f16> {
    (0..len)
        .map(|_| f16::from_f32(rng.random_range(-scale..scale)))
        .collect()
}

/// Runs the kernel benchmark on CUDA device 0: every `shapes` x `ms` cell with cuBLAS
/// f16 first (the baseline), then each 4-bit variant. Returns the measurements and
/// the copy bandwidth (GB/s, read + write bytes) measured first.
pub(super) fn kernels(
    args: &KernelArgs,
    shapes: &[Shape],
    ms: &[usize],
    variants: &[Variant],
) -> Result<(Vec<Measurement>, f64)> {
    if variants.contains(&Variant::Int4Int8Activations) {
        return Err(Error::Unsupported {
            what: "--weights int4-a8 on --backend cuda: int8 activations are a CPU kernel; use int4, int4-asym, nf4 or f16".into(),
        });
    }
    let device = CudaDevice::new(0)?;
    let info = device.info();
    let free = device.free_memory()?;
    let copy_bytes = COPY_BYTES.min((free / 8) as usize).max(1 << 20);
    eprintln!(
        "measuring device-to-device copy bandwidth ({} MiB buffer) ...",
        copy_bytes >> 20
    );
    let bw = measure_copy_bandwidth(&device, copy_bytes, COPY_RUNS)?;
    eprintln!("copy bandwidth {:.0} GB/s (read + write)", bw.gbps);
    // Rotating over copies that together are several times the L2 keeps the weights
    // streaming from device memory, as a model's layers do.
    let rotate_bytes = (3 * info.l2_cache_bytes.unwrap_or(64 << 20) as usize).max(128 << 20);
    let copies = |bytes: usize| {
        if args.hot {
            1
        } else {
            rotate_bytes.div_ceil(bytes.max(1)).clamp(1, 64)
        }
    };
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut results = Vec::new();
    let total = shapes.len() * ms.len();
    for (i, shape) in shapes.iter().enumerate() {
        let (k, n) = (shape.k, shape.n);
        let nk = n
            .checked_mul(k)
            .ok_or_else(|| Error::invalid("--shapes", format!("{k},{n} overflows")))?;
        let host = random_f16(&mut rng, nk, 0.05);
        let dense = (0..copies(nk * 2))
            .map(|_| CudaDenseLinear::upload(&device, &host, n, k, None))
            .collect::<Result<Vec<_>>>()?;
        drop(host);
        let mut q4 = Vec::new();
        for &v in variants {
            let Variant::Q4(kind) = v else { continue };
            let data = Q4Data::random(&mut rng, kind, n, k, args.group);
            let view = data.view(kind, n, k, args.group)?;
            let layers = (0..copies(view.nbytes()))
                .map(|_| CudaQ4Linear::upload(&device, view, None))
                .collect::<Result<Vec<_>>>()?;
            q4.push((v, layers));
        }
        for (j, &m) in ms.iter().enumerate() {
            eprintln!("[{}/{total}] K={k} N={n} M={m}", i * ms.len() + j + 1);
            let x = device.upload_f16(&random_f16(&mut rng, m * k, 1.0), m, k)?;
            let mut y = device.alloc_f16(m, n)?;
            let cell = Cell {
                shape: *shape,
                m,
                act_bytes: 2 * (m * k + m * n),
                flops: 2.0 * (m as f64) * (n as f64) * (k as f64),
                read_bw: bw.gbps,
            };
            let (times, batch) = time_launches(&device, args.seconds, |r| {
                dense[r % dense.len()].forward_into(&x, &mut y)
            })?;
            let baseline = quantile(&times, 0.5);
            results.push(cell.measurement("f16", "cublas", n * k * 2, &times, batch, baseline));
            let kernel = if m <= GEMV_MAX_M { "gemv" } else { "gemm" };
            for (v, layers) in &q4 {
                let (times, batch) = time_launches(&device, args.seconds, |r| {
                    layers[r % layers.len()].forward_into(&x, &mut y, Q4Kernel::Auto)
                })?;
                let bytes = layers[0].device_bytes() as usize;
                results.push(cell.measurement(v.name(), kernel, bytes, &times, batch, baseline));
            }
        }
    }
    device.synchronize()?;
    Ok((results, bw.gbps))
}
