//! The CPU backend's image ops (the VAE decoder's conv2d, GroupNorm and nearest 2x
//! upsampling) against f64 references written here from their definitions, on fresh
//! random inputs over awkward shapes (odd sizes, one-pixel images, batches, channel
//! counts that are not multiples of a SIMD width), and a refused shape per op.

mod common;

use std::sync::Arc;

use half::f16;
use hiprune::backend::{Backend, CpuBackend, CpuTensor, GroupNorm, ImageShape, LinearSource};
use hiprune::model::{MemoryTensor, Tensor, Weights};
use rand::Rng;
use rand::rngs::StdRng;

fn values(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Checks `max |got - want| / max |want| <= tol`.
fn compare(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let max_ref = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let max_err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    assert!(
        max_err / max_ref <= tol,
        "{what}: rel err {:.3e} > {tol:.1e}",
        max_err / max_ref
    );
}

/// `conv2d` by definition: out[p, o] = bias[o] + sum_{c, ky, kx} w[o, c, ky, kx] *
/// x[(y + ky - pad, x + kx - pad), c], zero outside the image.
fn conv2d_reference(
    x: &[f32],
    image: ImageShape,
    cin: usize,
    w: &[f32],
    bias: &[f32],
    cout: usize,
    kernel: usize,
) -> Vec<f64> {
    let pad = (kernel / 2) as isize;
    let (h, wd) = (image.height as isize, image.width as isize);
    let mut out = vec![0f64; image.batch * image.height * image.width * cout];
    for b in 0..image.batch {
        for py in 0..h {
            for px in 0..wd {
                let p = (b * image.height + py as usize) * image.width + px as usize;
                for o in 0..cout {
                    let mut acc = bias[o] as f64;
                    for c in 0..cin {
                        for ky in 0..kernel {
                            for kx in 0..kernel {
                                let (sy, sx) = (py + ky as isize - pad, px + kx as isize - pad);
                                if sy < 0 || sy >= h || sx < 0 || sx >= wd {
                                    continue;
                                }
                                let q =
                                    (b * image.height + sy as usize) * image.width + sx as usize;
                                let wv = w[((o * cin + c) * kernel + ky) * kernel + kx];
                                acc += wv as f64 * x[q * cin + c] as f64;
                            }
                        }
                    }
                    out[p * cout + o] = acc;
                }
            }
        }
    }
    out
}

fn weights_of(name: &str, data: Vec<f32>, shape: Vec<usize>) -> Arc<dyn LinearSource> {
    let tensors = [(
        format!("{name}.weight"),
        MemoryTensor::F32(Tensor::new(data, shape).unwrap()),
    )];
    Arc::new(Weights::from_memory(tensors.into_iter().collect()))
}

#[test]
fn conv2d_matches_the_definition() {
    let mut rng = common::seeded_rng("conv2d_matches_the_definition");
    let cpu = CpuBackend::new();
    // (batch, height, width, in, out, kernel)
    for &(batch, height, width, cin, cout, kernel) in &[
        (1, 1, 1, 3, 5, 3),
        (1, 7, 5, 16, 32, 3),
        (2, 4, 9, 3, 7, 3),
        (1, 6, 6, 13, 11, 1),
        (2, 3, 2, 5, 4, 5),
        (1, 33, 17, 8, 3, 3),
    ] {
        let image = ImageShape {
            batch,
            height,
            width,
        };
        let pixels = batch * height * width;
        let x = values(&mut rng, pixels * cin);
        let w = values(&mut rng, cout * cin * kernel * kernel);
        let bias = values(&mut rng, cout);
        let want = conv2d_reference(&x, image, cin, &w, &bias, cout, kernel);
        let source = weights_of("conv", w.clone(), vec![cout, cin, kernel, kernel]);
        let layer = cpu
            .upload_linear(&source, "conv", cout, cin * kernel * kernel, Some(&bias))
            .unwrap();
        let xt = cpu.upload(&x, pixels, cin).unwrap();
        let got = cpu.conv2d(&xt, &layer, image, kernel).unwrap();
        compare(
            &format!("conv2d {image} {cin}->{cout} k{kernel}"),
            got.data(),
            &want,
            1e-5,
        );

        // The same layer with f16 weights: the reference on the rounded weights.
        let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let rounded: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        let want16 = conv2d_reference(&x, image, cin, &rounded, &bias, cout, kernel);
        let dense = cpu
            .upload_dense(&rounded, cout, cin * kernel * kernel, Some(&bias))
            .unwrap();
        let got16 = cpu.conv2d(&xt, &dense, image, kernel).unwrap();
        compare("conv2d f16-rounded weights", got16.data(), &want16, 1e-5);
    }
}

#[test]
fn conv2d_refuses_mismatched_shapes() {
    let cpu = CpuBackend::new();
    let image = ImageShape {
        batch: 1,
        height: 2,
        width: 2,
    };
    let layer = cpu.upload_dense(&[0.0; 4 * 27], 4, 27, None).unwrap();
    let x = cpu.upload(&[0.0; 4 * 3], 4, 3).unwrap();
    assert!(cpu.conv2d(&x, &layer, image, 3).is_ok());
    // An even kernel, a kernel that does not divide K, and rows that are not the image.
    assert!(cpu.conv2d(&x, &layer, image, 2).is_err());
    let layer5 = cpu.upload_dense(&[0.0; 4 * 26], 4, 26, None).unwrap();
    assert!(cpu.conv2d(&x, &layer5, image, 3).is_err());
    let wrong = ImageShape {
        batch: 1,
        height: 3,
        width: 2,
    };
    let err = cpu.conv2d(&x, &layer, wrong, 3).unwrap_err();
    assert!(err.to_string().contains("conv2d"), "{err}");
}

#[allow(clippy::too_many_arguments)]
fn group_norm_reference(
    x: &[f32],
    batch: usize,
    channels: usize,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f64,
    silu: bool,
) -> Vec<f64> {
    let per_item = x.len() / batch;
    let pixels = per_item / channels;
    let width = channels / groups;
    let mut out = vec![0f64; x.len()];
    for b in 0..batch {
        for g in 0..groups {
            let vals: Vec<f64> = (0..pixels)
                .flat_map(|p| (0..width).map(move |c| (p, g * width + c)))
                .map(|(p, c)| x[b * per_item + p * channels + c] as f64)
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            for p in 0..pixels {
                for c in g * width..(g + 1) * width {
                    let i = b * per_item + p * channels + c;
                    let n = (x[i] as f64 - mean) / (var + eps).sqrt() * weight[c] as f64
                        + bias[c] as f64;
                    out[i] = if silu { n / (1.0 + (-n).exp()) } else { n };
                }
            }
        }
    }
    out
}

#[test]
fn group_norm_matches_the_definition() {
    let mut rng = common::seeded_rng("group_norm_matches_the_definition");
    let cpu = CpuBackend::new();
    // (batch, pixels, channels, groups)
    for &(batch, pixels, channels, groups) in &[
        (1, 1, 8, 4),
        (2, 35, 32, 8),
        (1, 77, 48, 16),
        (3, 5, 6, 3),
        (1, 64, 16, 1),
    ] {
        let mut x = values(&mut rng, batch * pixels * channels);
        // An offset mean, as activations have, so a one-pass variance would show.
        for v in &mut x {
            *v += 3.0;
        }
        let weight = values(&mut rng, channels);
        let bias = values(&mut rng, channels);
        let xt = cpu.upload(&x, batch * pixels, channels).unwrap();
        let (wt, bt) = (
            cpu.upload(&weight, 1, channels).unwrap(),
            cpu.upload(&bias, 1, channels).unwrap(),
        );
        for silu in [false, true] {
            let norm = GroupNorm {
                groups,
                weight: &wt,
                bias: &bt,
                eps: 1e-6,
            };
            let got = cpu.group_norm(&xt, batch, norm, silu).unwrap();
            let want =
                group_norm_reference(&x, batch, channels, groups, &weight, &bias, 1e-6, silu);
            compare(
                &format!("group_norm b{batch} p{pixels} c{channels} g{groups} silu {silu}"),
                got.data(),
                &want,
                1e-5,
            );
        }
        let bad = GroupNorm {
            groups: channels + 1,
            weight: &wt,
            bias: &bt,
            eps: 1e-6,
        };
        assert!(cpu.group_norm(&xt, batch, bad, false).is_err());
    }
}

#[test]
fn group_norm_refuses_bad_parameters() {
    let cpu = CpuBackend::new();
    let x = cpu.upload(&[1.0; 12], 3, 4).unwrap();
    let w = cpu.upload(&[1.0; 3], 1, 3).unwrap();
    let b = cpu.upload(&[0.0; 4], 1, 4).unwrap();
    let norm = GroupNorm {
        groups: 2,
        weight: &w,
        bias: &b,
        eps: 1e-6,
    };
    let err = cpu.group_norm(&x, 1, norm, false).unwrap_err();
    assert!(err.to_string().contains("group_norm weight"), "{err}");
    let ok = GroupNorm { weight: &b, ..norm };
    // Three pixel rows do not split into two batch items.
    assert!(cpu.group_norm(&x, 2, ok, false).is_err());
    assert!(cpu.group_norm(&x, 3, ok, false).is_ok());
}

#[test]
fn upsample_repeats_each_pixel_twice_each_way() {
    let mut rng = common::seeded_rng("upsample_repeats_each_pixel_twice_each_way");
    let cpu = CpuBackend::new();
    for &(batch, height, width, channels) in &[(1, 1, 1, 1), (2, 3, 5, 7), (1, 8, 3, 32)] {
        let image = ImageShape {
            batch,
            height,
            width,
        };
        let x = values(&mut rng, batch * height * width * channels);
        let xt: CpuTensor = cpu.upload(&x, batch * height * width, channels).unwrap();
        let got = cpu.upsample_nearest2x(&xt, image).unwrap();
        let mut want = Vec::new();
        for b in 0..batch {
            for oy in 0..2 * height {
                for ox in 0..2 * width {
                    let p = (b * height + oy / 2) * width + ox / 2;
                    want.extend(
                        x[p * channels..(p + 1) * channels]
                            .iter()
                            .map(|&v| v as f64),
                    );
                }
            }
        }
        compare("upsample", got.data(), &want, 0.0);
        let wrong = ImageShape {
            batch,
            height: height + 1,
            width,
        };
        assert!(cpu.upsample_nearest2x(&xt, wrong).is_err());
    }
}
