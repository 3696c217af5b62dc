//! The positional table held without a full f32 copy: crops of computed and stored
//! tables against the full table, forwards that agree bit for bit whether the table is
//! stored or computed, the bytes a model reports holding, and the planner's estimate
//! of a package whose table is computed.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use half::{bf16, f16};
use hiprune::Error;
use hiprune::compress::plan::{estimate_bytes, estimate_package_bytes};
use hiprune::compress::quantize::pos_table_is_sincos;
use hiprune::compress::{
    CompressOptions, GenerateOptions, PlanOptions, PlanTarget, Preset, WeightFormat,
    compress_checkpoint, generate_checkpoint, make_plan,
};
use hiprune::format::{Dtype, Package, PackageInfo, PackageWriter};
use hiprune::model::pos_embed::{sincos_2d_crop, sincos_2d_table};
use hiprune::model::weights::{POS_TABLE, PosTable};
use hiprune::model::{MemoryTensor, Mmdit, MmditConfig, MmditInputs, PruneSpec, Tensor, Weights};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The rows of `full` (`[grid * grid, dim]`) for grid rows `top..top + h` by columns
/// `left..left + w`, row-major.
fn rows_of(
    full: &[f32],
    grid: usize,
    dim: usize,
    top: usize,
    left: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(h * w * dim);
    for r in top..top + h {
        for c in left..left + w {
            out.extend_from_slice(&full[(r * grid + c) * dim..][..dim]);
        }
    }
    out
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn crop_rows_equal_the_full_tables_rows() {
    use Dtype::{Bf16, F16, F32};
    let chains: [&[Dtype]; 7] = [
        &[],
        &[F32],
        &[F16],
        &[Bf16],
        &[F32, F16],
        &[F16, Bf16],
        &[Bf16, F16],
    ];
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut cases: Vec<(usize, usize, usize, &[Dtype])> = (0..40)
        .map(|_| {
            (
                rng.random_range(1..26),
                rng.random_range(1..13),
                4 * rng.random_range(1..11),
                chains[rng.random_range(0..chains.len())],
            )
        })
        .collect();
    // The real grid / base_size ratios: SD3.5 Large (192 / 64) and Medium (384 / 64),
    // with the f16 checkpoint's and the f16 package's rounding.
    cases.push((192, 64, 12, &[F16, F16]));
    cases.push((384, 64, 8, &[F16, F16]));
    cases.push((384, 64, 8, &[Bf16, F32]));
    for (grid, base, dim, chain) in cases {
        let full = sincos_2d_table(grid, base, dim, chain).unwrap();
        let (h, w) = if grid >= 128 {
            // A 1024 px image's centre crop and an odd one.
            (if rng.random_bool(0.5) { 64 } else { 37 }, 64)
        } else {
            (rng.random_range(0..=grid), rng.random_range(0..=grid))
        };
        let centre = ((grid - h) / 2, (grid - w) / 2);
        let anywhere = (
            rng.random_range(0..=grid - h),
            rng.random_range(0..=grid - w),
        );
        for (top, left) in [centre, anywhere, (0, 0), (grid - h, grid - w)] {
            let crop = sincos_2d_crop(grid, base, dim, chain, top, left, h, w).unwrap();
            let want = rows_of(&full, grid, dim, top, left, h, w);
            assert!(
                same_bits(&crop, &want),
                "grid {grid} base {base} dim {dim} chain {chain:?} crop {h}x{w} at ({top},{left})"
            );
        }
        // The whole grid is the whole table.
        let all = sincos_2d_crop(grid, base, dim, chain, 0, 0, grid, grid).unwrap();
        assert!(same_bits(&all, &full));
    }
}

#[test]
fn crop_requests_outside_the_grid_are_errors() {
    let f16 = [Dtype::F16];
    assert!(sincos_2d_crop(8, 4, 16, &f16, 0, 0, 8, 8).is_ok());
    assert!(sincos_2d_crop(8, 4, 16, &f16, 1, 0, 8, 8).is_err());
    assert!(sincos_2d_crop(8, 4, 16, &f16, 0, 7, 1, 2).is_err());
    assert!(sincos_2d_crop(8, 4, 16, &f16, usize::MAX, 0, 2, 2).is_err());
    assert!(sincos_2d_crop(8, 4, 16, &[Dtype::U8], 0, 0, 2, 2).is_err());
    assert!(sincos_2d_crop(8, 4, 14, &f16, 0, 0, 2, 2).is_err());
    assert!(sincos_2d_crop(0, 4, 16, &f16, 0, 0, 0, 0).is_err());
    assert!(sincos_2d_crop(8, 0, 16, &f16, 0, 0, 0, 0).is_err());
    assert!(sincos_2d_crop(usize::MAX, 1, 16, &f16, 0, 0, 1, 1).is_err());
}

/// Writes `tensors` (name, dtype, shape, little-endian bytes) as a one-file diffusers
/// folder.
fn write_folder(dir: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    write_file(&dir.join("diffusion_pytorch_model.safetensors"), tensors);
}

/// Writes `tensors` as the safetensors file `path`.
fn write_file(path: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes a one-file folder holding a 1-byte U8 tensor and then the table, whose
/// bytes thus start at an odd offset.
fn write_misaligned(dir: &Path, dtype: safetensors::Dtype, shape: &[usize], bytes: &[u8]) {
    let name = match dtype {
        safetensors::Dtype::F32 => "F32",
        safetensors::Dtype::F16 => "F16",
        _ => "BF16",
    };
    let mut header = format!(
        "{{\"a\":{{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}},\
         \"{POS_TABLE}\":{{\"dtype\":\"{name}\",\"shape\":{shape:?},\"data_offsets\":[1,{}]}}}}",
        1 + bytes.len()
    );
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.push(7);
    file.extend_from_slice(bytes);
    std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), file).unwrap();
}

fn bytes_of(values: &[f32], dtype: safetensors::Dtype) -> Vec<u8> {
    match dtype {
        safetensors::Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        safetensors::Dtype::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

fn check_stored(t: &PosTable<'_>, full: &[f32], held: u64, rng: &mut StdRng) {
    let (grid, dim) = (t.grid(), t.dim());
    assert!(matches!(t, PosTable::Stored { .. }));
    assert_eq!(t.held_bytes(), held);
    for _ in 0..6 {
        let h = rng.random_range(0..=grid);
        let w = rng.random_range(0..=grid);
        let top = rng.random_range(0..=grid - h);
        let left = rng.random_range(0..=grid - w);
        let crop = t.crop(top, left, h, w).unwrap();
        assert!(same_bits(&crop, &rows_of(full, grid, dim, top, left, h, w)));
    }
    assert!(t.crop(1, 0, grid, 1).is_err());
    assert!(t.crop(0, usize::MAX, 1, 2).is_err());
}

#[test]
fn stored_tables_crop_in_every_dtype_without_a_copy() {
    let mut rng = StdRng::seed_from_u64(91);
    let (grid, dim) = (rng.random_range(5..14), 4 * rng.random_range(1..6));
    let shape = vec![1, grid * grid, dim];
    let values: Vec<f32> = (0..grid * grid * dim)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect();
    for (dtype, elem) in [
        (safetensors::Dtype::F32, 4u64),
        (safetensors::Dtype::F16, 2),
        (safetensors::Dtype::BF16, 2),
    ] {
        for misalign in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let bytes = bytes_of(&values, dtype);
            if misalign {
                // A 1-byte tensor before the table shifts it off its alignment: held
                // as an f32 copy then.
                write_misaligned(dir.path(), dtype, &shape, &bytes);
            } else {
                write_folder(dir.path(), &[(POS_TABLE, dtype, shape.clone(), bytes)]);
            }
            let w = Weights::from_folder(dir.path()).unwrap();
            let full = w.f32_tensor(POS_TABLE, &shape).unwrap();
            let t = w.pos_table(POS_TABLE, grid, dim).unwrap();
            let copied = matches!(
                t,
                PosTable::Stored {
                    data: hiprune::quant::DenseData::F32(_),
                    ..
                }
            );
            assert_eq!(copied, misalign || dtype == safetensors::Dtype::F32);
            let held = match &t {
                PosTable::Stored {
                    data: hiprune::quant::DenseData::F32(_),
                    ..
                } => 4 * full.len() as u64,
                _ => elem * full.len() as u64,
            };
            check_stored(&t, &full, held, &mut rng);
            match w.pos_table(POS_TABLE, grid + 1, dim).unwrap_err() {
                Error::ShapeMismatch { tensor, .. } => assert_eq!(tensor, POS_TABLE),
                e => panic!("{e}"),
            }
            match w.pos_table("pos_embed.other", grid, dim).unwrap_err() {
                Error::MissingTensor { tensor } => assert_eq!(tensor, "pos_embed.other"),
                e => panic!("{e}"),
            }
        }
    }

    // In memory.
    let w = Weights::from_memory(HashMap::from([(
        POS_TABLE.to_string(),
        MemoryTensor::F32(Tensor::new(values.clone(), shape.clone()).unwrap()),
    )]));
    let t = w.pos_table(POS_TABLE, grid, dim).unwrap();
    check_stored(&t, &values, 4 * values.len() as u64, &mut rng);

    // Stored in a package, in each float dtype.
    let dir = tempfile::tempdir().unwrap();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        let path = dir.path().join(format!("{}.hpk", dtype.name()));
        let mut pw = PackageWriter::create(&path).unwrap();
        let elem = match dtype {
            Dtype::F32 => {
                pw.add_f32(POS_TABLE, &shape, &values).unwrap();
                4
            }
            Dtype::F16 => {
                let h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
                pw.add_f16(POS_TABLE, &shape, &h).unwrap();
                2
            }
            _ => {
                let h: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
                pw.add_bf16(POS_TABLE, &shape, &h).unwrap();
                2
            }
        };
        pw.finish(PackageInfo::default()).unwrap();
        let w = Weights::from_package(Package::open(&path).unwrap());
        let full = w.f32_tensor(POS_TABLE, &shape).unwrap();
        let t = w.pos_table(POS_TABLE, grid, dim).unwrap();
        check_stored(&t, &full, elem * full.len() as u64, &mut rng);
    }
}

/// A tiny seeded model with a `grid x grid` positional table.
fn tiny_config(grid: usize) -> MmditConfig {
    MmditConfig {
        pos_embed_max_size: grid,
        ..Preset::Tiny.config()
    }
}

fn random_tensor(rng: &mut StdRng, shape: Vec<usize>) -> Tensor {
    let n = shape.iter().product();
    Tensor::new(
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
        shape,
    )
    .unwrap()
}

/// Runs `models` on the same random inputs with an awkward latent (non-square, odd
/// patch grid, batch 2) and checks the outputs agree bit for bit.
fn assert_same_forwards(models: &[&Mmdit], rng: &mut StdRng) {
    let cfg = models[0].config().clone();
    for (h, w) in [(10usize, 6usize), (2, 14), (2 * cfg.pos_embed_max_size, 4)] {
        let hs = random_tensor(rng, vec![2, cfg.in_channels, h, w]);
        let ehs = random_tensor(rng, vec![2, 7, cfg.joint_attention_dim]);
        let pooled = random_tensor(rng, vec![2, cfg.pooled_projection_dim]);
        let t = Tensor::new(vec![rng.random_range(0.0..1000.0), 3.5], vec![2]).unwrap();
        let inputs = MmditInputs {
            hidden_states: &hs,
            encoder_hidden_states: &ehs,
            pooled_projections: &pooled,
            timestep: &t,
        };
        let first = models[0].forward(&inputs).unwrap();
        assert!(first.data.iter().all(|v| v.is_finite()));
        for m in &models[1..] {
            let out = m.forward(&inputs).unwrap();
            assert!(same_bits(&out.data, &first.data), "latent {h}x{w}");
        }
    }
}

fn table_precision(path: &Path) -> Option<hiprune::format::Precision> {
    Package::open(path)
        .unwrap()
        .manifest()
        .layers
        .iter()
        .find(|l| l.name == POS_TABLE)
        .map(|l| l.precision)
}

#[test]
fn stored_and_computed_tables_give_identical_forwards_and_honest_byte_counts() {
    let mut rng = StdRng::seed_from_u64(2024);
    for (f16_ckpt, fmt) in [(false, WeightFormat::F32), (true, WeightFormat::F16)] {
        let grid = rng.random_range(9..24);
        let cfg = tiny_config(grid);
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        let mut gen_opts = GenerateOptions::new(cfg.clone());
        gen_opts.f16 = f16_ckpt;
        gen_opts.seed = rng.random();
        generate_checkpoint(&ckpt, &gen_opts).unwrap();
        let hpk = dir.path().join("model.hpk");
        let opts = CompressOptions {
            weights: fmt,
            ..CompressOptions::default()
        };
        compress_checkpoint(&ckpt, &hpk, &opts, &mut |_| {}).unwrap();
        assert!(table_precision(&hpk).is_some_and(|p| p.is_computed()));

        let folder = Mmdit::load(&ckpt).unwrap();
        let package = Mmdit::load(&hpk).unwrap();
        let table_bytes = (grid * grid * cfg.hidden_size()) as u64 * if f16_ckpt { 2 } else { 4 };
        assert!(matches!(
            package
                .weights()
                .pos_table(POS_TABLE, grid, cfg.hidden_size())
                .unwrap(),
            PosTable::Sincos2d { .. }
        ));
        // The same biases and f32 copies of the small tensors; the table counts in the folder
        // model only (as its stored bytes), not in the package that computes it.
        assert_eq!(
            folder.weight_bytes().unwrap().other,
            package.weight_bytes().unwrap().other + table_bytes
        );
        assert!(package.weight_bytes().unwrap().other < table_bytes);
        assert_same_forwards(&[&folder, &package], &mut rng);
    }
}

#[test]
fn a_stored_table_in_a_package_matches_its_checkpoint() {
    // An f16 checkpoint whose table is not the sin-cos one: the package stores it
    // (f16, as in the checkpoint), and both models run the same forward.
    let mut rng = StdRng::seed_from_u64(77);
    let grid = 11;
    let cfg = tiny_config(grid);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let mut gen_opts = GenerateOptions::new(cfg.clone());
    gen_opts.seed = 5;
    generate_checkpoint(&ckpt, &gen_opts).unwrap();
    edit_table(&ckpt, |t| {
        for v in t.iter_mut() {
            *v = rng.random_range(-2.0..2.0);
        }
    });
    let hpk = dir.path().join("model.hpk");
    let opts = CompressOptions {
        weights: WeightFormat::F16,
        ..CompressOptions::default()
    };
    compress_checkpoint(&ckpt, &hpk, &opts, &mut |_| {}).unwrap();
    assert!(table_precision(&hpk).is_none());
    let folder = Mmdit::load(&ckpt).unwrap();
    let package = Mmdit::load(&hpk).unwrap();
    assert_eq!(
        folder.weight_bytes().unwrap().other,
        package.weight_bytes().unwrap().other
    );
    assert_same_forwards(&[&folder, &package], &mut rng);
}

/// Rewrites the positional table of the (sharded) checkpoint in `dir` (kept in its
/// dtype) through `edit`, which sees it as f32.
fn edit_table(dir: &Path, edit: impl FnOnce(&mut Vec<f32>)) {
    let (file, bytes) = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .find(|(_, b)| {
            safetensors::SafeTensors::deserialize(b)
                .unwrap()
                .names()
                .contains(&POS_TABLE)
        })
        .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                v.dtype(),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect();
    let entry = tensors.iter_mut().find(|t| t.0 == POS_TABLE).unwrap();
    let mut values: Vec<f32> = match entry.1 {
        safetensors::Dtype::F32 => entry
            .3
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => entry
            .3
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => entry
            .3
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    };
    edit(&mut values);
    entry.3 = bytes_of(&values, entry.1);
    drop(st);
    let refs: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
        .collect();
    write_file(&file, &refs);
}

#[test]
fn the_sincos_check_agrees_with_the_compressor() {
    let mut rng = StdRng::seed_from_u64(404);
    // A grid over the check's strip height, so the table is compared in several strips.
    let grid = 37;
    let cfg = tiny_config(grid);
    let base = cfg.sample_size / cfg.patch_size;
    let d = cfg.hidden_size();
    let dir = tempfile::tempdir().unwrap();
    type Edit = Box<dyn Fn(&mut Vec<f32>, &mut StdRng)>;
    let cases: Vec<(&str, bool, Edit, bool)> = vec![
        ("f32 sincos", false, Box::new(|_, _| {}), true),
        ("f16 sincos", true, Box::new(|_, _| {}), true),
        (
            "bf16-rounded sincos in f32",
            false,
            Box::new(move |t, _| *t = sincos_2d_table(grid, base, d, &[Dtype::Bf16]).unwrap()),
            true,
        ),
        (
            "one element off in the last strip",
            false,
            Box::new(move |t, rng| {
                let i = rng.random_range((grid - 1) * grid * d..grid * grid * d);
                t[i] = f32::from_bits(t[i].to_bits() ^ 1);
            }),
            false,
        ),
        (
            "one element off in f16",
            true,
            Box::new(|t, rng| {
                let i = rng.random_range(0..t.len());
                t[i] += 0.25;
            }),
            false,
        ),
    ];
    for (what, f16_ckpt, edit, want) in cases {
        let ckpt = dir.path().join(what.replace(' ', "_"));
        let mut gen_opts = GenerateOptions::new(cfg.clone());
        gen_opts.f16 = f16_ckpt;
        generate_checkpoint(&ckpt, &gen_opts).unwrap();
        edit_table(&ckpt, |t| edit(t, &mut rng));
        let weights = Weights::from_folder(&ckpt).unwrap();
        assert_eq!(pos_table_is_sincos(&weights, &cfg).unwrap(), want, "{what}");
        let hpk = dir.path().join(format!("{}.hpk", what.replace(' ', "_")));
        compress_checkpoint(&ckpt, &hpk, &CompressOptions::default(), &mut |_| {}).unwrap();
        assert_eq!(
            table_precision(&hpk).is_some_and(|p| p.is_computed()),
            want,
            "{what}"
        );
    }
    // A config the table does not fit is simply not computed; a missing table is an
    // error naming it.
    let ckpt = dir.path().join("f32_sincos");
    let weights = Weights::from_folder(&ckpt).unwrap();
    let odd = MmditConfig {
        sample_size: 1,
        ..cfg.clone()
    };
    assert!(!pos_table_is_sincos(&weights, &odd).unwrap());
    let empty = Weights::from_memory(HashMap::new());
    match pos_table_is_sincos(&empty, &cfg).unwrap_err() {
        Error::MissingTensor { tensor } => assert_eq!(tensor, POS_TABLE),
        e => panic!("{e}"),
    }
}

#[test]
fn plans_count_a_computed_table_as_zero_bytes() {
    let mut rng = StdRng::seed_from_u64(8);
    let grid = 32;
    let cfg = tiny_config(grid);
    let table = (grid * grid * cfg.hidden_size()) as u64;
    let none = BTreeSet::new();
    for fmt in [
        WeightFormat::Int4,
        WeightFormat::Int4Asym,
        WeightFormat::Nf4,
        WeightFormat::F16,
        WeightFormat::F32,
    ] {
        let spec = PruneSpec::remove_blocks([rng.random_range(0..3)]);
        let stored = estimate_bytes(&cfg, &spec, fmt, 64, &none);
        assert_eq!(
            estimate_package_bytes(&cfg, &spec, fmt, 64, &none, false),
            stored
        );
        let elem = if fmt == WeightFormat::F32 { 4 } else { 2 };
        assert_eq!(
            estimate_package_bytes(&cfg, &spec, fmt, 64, &none, true),
            stored - elem * table
        );
    }

    // A byte target the unpruned package meets only because its table is computed.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    generate_checkpoint(&ckpt, &GenerateOptions::new(cfg.clone())).unwrap();
    let computed = pos_table_is_sincos(&Weights::from_folder(&ckpt).unwrap(), &cfg).unwrap();
    assert!(computed);
    let real = estimate_package_bytes(
        &cfg,
        &PruneSpec::none(),
        WeightFormat::Int4,
        64,
        &none,
        true,
    );
    let plan = |pos_table_computed| {
        make_plan(
            &cfg,
            None,
            &PlanOptions {
                target: PlanTarget::Bytes(real),
                pos_table_computed,
                ..PlanOptions::default()
            },
        )
        .unwrap()
    };
    let honest = plan(true);
    assert!(honest.removed_blocks.is_empty(), "{}", honest.summary);
    assert_eq!(honest.estimated_bytes, real);
    let conservative = plan(false);
    assert!(!conservative.removed_blocks.is_empty());
    // The f16 reference the ratio target uses is the checkpoint's, table included.
    assert_eq!(honest.dense_f16_bytes, conservative.dense_f16_bytes);

    // The estimate is the package's size up to the manifest and alignment.
    let hpk = dir.path().join("model.hpk");
    let opts = honest.compress_options(CompressOptions::default());
    let summary = compress_checkpoint(&ckpt, &hpk, &opts, &mut |_| {}).unwrap();
    let overhead = summary.output_bytes as i64 - honest.estimated_bytes as i64;
    assert!(
        (0..64 * 1024).contains(&overhead),
        "package {} bytes, estimate {}",
        summary.output_bytes,
        honest.estimated_bytes
    );
    let stored = estimate_bytes(&cfg, &PruneSpec::none(), WeightFormat::Int4, 64, &none);
    assert_eq!(stored, real + 2 * table);
    assert!(stored > summary.output_bytes + table);
}
