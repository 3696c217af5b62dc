//! The fused 4-bit GEMV on every CPU path against the f64 reference.

use half::f16;
use hiprune::backend::cpu::KernelPath;
use hiprune::backend::cpu::gemv::gemv_q4;
use hiprune::quant::reference::{dequantize, linear_f64, linear_magnitude};
use hiprune::{Error, Q4Kind, Q4Matrix};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Relative tolerance against `linear_magnitude`.
const TOL: f64 = 1e-5;

/// A generator with a fresh seed (or `HIPRUNE_TEST_SEED`), printed so a failure can be
/// replayed.
fn seeded_rng() -> StdRng {
    let seed = std::env::var("HIPRUNE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x5eed, |d| d.as_nanos() as u64)
        });
    println!("seed {seed} (set HIPRUNE_TEST_SEED to replay)");
    StdRng::seed_from_u64(seed)
}

fn random_matrix(rng: &mut StdRng, kind: Q4Kind, n: usize, k: usize, group: usize) -> Q4Matrix {
    let groups = n * k / group;
    let packed = (0..n * k / 2).map(|_| rng.random::<u8>()).collect();
    let scales = (0..groups)
        .map(|_| f16::from_f32(rng.random_range(0.001f32..0.05)))
        .collect();
    let offsets = if kind.has_offsets() {
        (0..groups)
            .map(|_| f16::from_f32(rng.random_range(-0.4f32..0.1)))
            .collect()
    } else {
        Vec::new()
    };
    Q4Matrix {
        kind,
        n,
        k,
        group,
        packed,
        scales,
        offsets,
    }
}

fn random_vec(rng: &mut StdRng, len: usize, lim: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-lim..lim)).collect()
}

/// Runs one case on every available path and checks every output element.
fn check_case(rng: &mut StdRng, kind: Q4Kind, group: usize, m: usize, n: usize, k: usize) {
    let mat = random_matrix(rng, kind, n, k, group);
    let w = mat.view().expect("valid matrix");
    let x = random_vec(rng, m * k, 2.0);
    let bias = rng.random_bool(0.5).then(|| random_vec(rng, n, 1.0));
    let dense = dequantize(&w);
    let want = linear_f64(&x, m, &dense, n, k, bias.as_deref());
    let mag = linear_magnitude(&x, m, &dense, n, k, bias.as_deref());
    for path in KernelPath::available() {
        let mut y = vec![f32::NAN; m * n];
        gemv_q4(path, &x, m, &w, bias.as_deref(), &mut y).expect("gemv_q4 runs");
        for (idx, ((&got, &r), &mg)) in y.iter().zip(&want).zip(&mag).enumerate() {
            let err = (f64::from(got) - r).abs();
            assert!(
                err <= TOL * mg,
                "{path} {kind} G={group} M={m} N={n} K={k} bias={}: y[{}, {}] = {got}, \
                 reference {r}, error {err:e} > {TOL:e} * {mg}",
                bias.is_some(),
                idx / n,
                idx % n,
            );
        }
    }
}

#[test]
fn every_path_matches_reference_on_awkward_shapes() {
    let mut rng = seeded_rng();
    let ns = [1usize, 7, 33, 129];
    for kind in [Q4Kind::Int4, Q4Kind::Nf4, Q4Kind::Int4Sym] {
        for group in [32usize, 64, 128] {
            for m in [1usize, 3, 17, 64] {
                for _ in 0..2 {
                    let n = ns[rng.random_range(0..ns.len())];
                    let mut ks = vec![group, 3 * group, 2432];
                    if rng.random_bool(0.25) {
                        ks.push(9728);
                    }
                    let k = ks[rng.random_range(0..ks.len())];
                    check_case(&mut rng, kind, group, m, n, k);
                }
            }
        }
    }
}

#[test]
fn threaded_split_matches_reference() {
    // Large enough to be split into several tasks; an odd thread count makes uneven
    // chunks, and a remainder of rows that is not a multiple of any SIMD width.
    let mut rng = seeded_rng();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .expect("thread pool");
    pool.install(|| {
        for kind in [Q4Kind::Int4, Q4Kind::Nf4, Q4Kind::Int4Sym] {
            let n = rng.random_range(300..700);
            let group = [32, 64, 128][rng.random_range(0..3)];
            check_case(&mut rng, kind, group, 1, n, 2432);
            check_case(&mut rng, kind, group, 5, n, 1536);
        }
    });
}

#[test]
fn rejects_wrong_lengths() {
    let mut rng = seeded_rng();
    let (m, n, k) = (3, 7, 64);
    let mat = random_matrix(&mut rng, Q4Kind::Int4, n, k, 32);
    let w = mat.view().expect("valid matrix");
    let x = random_vec(&mut rng, m * k, 1.0);
    let bias = random_vec(&mut rng, n, 1.0);
    let mut y = vec![0.0f32; m * n];
    let path = KernelPath::Portable;

    let err = gemv_q4(path, &x[..m * k - 1], m, &w, None, &mut y).unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { expected, found, .. } if expected == m * k && found == m * k - 1),
        "short x: {err}"
    );
    let err = gemv_q4(path, &x, m + 1, &w, None, &mut y).unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { .. }),
        "M too big: {err}"
    );
    let mut y_long = vec![0.0f32; m * n + 1];
    let err = gemv_q4(path, &x, m, &w, None, &mut y_long).unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { expected, found, .. } if expected == m * n && found == m * n + 1),
        "long y: {err}"
    );
    let err = gemv_q4(path, &x, m, &w, Some(&bias[..n - 1]), &mut y).unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { expected, found, .. } if expected == n && found == n - 1),
        "short bias: {err}"
    );
    // y untouched by the rejected calls above stays as it was; a correct call works.
    gemv_q4(path, &x, m, &w, Some(&bias), &mut y).expect("valid call");
    assert!(y.iter().all(|v| v.is_finite()));
}

#[test]
fn rejects_paths_this_cpu_lacks() {
    let mut rng = seeded_rng();
    let mat = random_matrix(&mut rng, Q4Kind::Nf4, 4, 64, 64);
    let w = mat.view().expect("valid matrix");
    let x = random_vec(&mut rng, 64, 1.0);
    let available = KernelPath::available();
    assert!(available.contains(&KernelPath::Portable));
    for path in [
        KernelPath::Portable,
        KernelPath::Avx2,
        KernelPath::Avx512,
        KernelPath::Avx512Vnni,
    ] {
        let mut y = vec![f32::NAN; 4];
        let res = gemv_q4(path, &x, 1, &w, None, &mut y);
        if available.contains(&path) {
            res.expect("available path runs");
            assert!(y.iter().all(|v| v.is_finite()), "{path} left y unwritten");
        } else {
            let err = res.unwrap_err();
            assert!(matches!(err, Error::Unsupported { .. }), "{path}: {err}");
        }
    }
}

#[test]
fn zero_rows_of_x_is_a_no_op() {
    let mut rng = seeded_rng();
    let mat = random_matrix(&mut rng, Q4Kind::Int4, 5, 128, 128);
    let w = mat.view().expect("valid matrix");
    for path in KernelPath::available() {
        gemv_q4(path, &[], 0, &w, None, &mut []).expect("M = 0 is valid");
    }
}
