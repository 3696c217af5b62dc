//! Writing packages and reading them back: bytes, typed views, 4-bit layers, manifest,
//! alignment, checksums, interoperability with the `safetensors` crate, and the
//! writer's own argument checks.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use half::{bf16, f16};
use hiprune::format::{
    Dtype, FORMAT_NAME, LayerEntry, MANIFEST_TENSOR, Package, PackageInfo, PackageWriter,
    Precision, Provenance,
};
use hiprune::model::MmditConfig;
use hiprune::quant::reference;
use hiprune::{Error, Q4Kind, Q4Matrix};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A 4-bit matrix with random codes, scales and (INT4) offsets.
fn random_q4(rng: &mut StdRng, kind: Q4Kind, n: usize, k: usize, group: usize) -> Q4Matrix {
    let groups = n * (k / group);
    Q4Matrix {
        kind,
        n,
        k,
        group,
        packed: (0..n * k / 2)
            .map(|_| rng.random_range(0..=255u8))
            .collect(),
        scales: (0..groups)
            .map(|_| f16::from_f32(rng.random_range(0.001f32..0.2)))
            .collect(),
        offsets: if kind == Q4Kind::Int4 {
            (0..groups)
                .map(|_| f16::from_f32(rng.random_range(-1.5f32..0.0)))
                .collect()
        } else {
            Vec::new()
        },
    }
}

fn random_f32(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-4.0f32..4.0)).collect()
}

/// Expected content of one stored tensor.
struct Expected {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Everything written into the mixed test package, to compare against.
struct Written {
    tensors: BTreeMap<String, Expected>,
    q4: HashMap<String, (Q4Matrix, Option<Vec<f32>>)>,
    info: PackageInfo,
}

fn expect(
    map: &mut BTreeMap<String, Expected>,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    bytes: &[u8],
) {
    map.insert(
        name.to_string(),
        Expected {
            dtype,
            shape: shape.to_vec(),
            bytes: bytes.to_vec(),
        },
    );
}

/// Writes a package holding every precision, interleaving the alignment classes.
fn write_mixed(path: &Path, seed: u64) -> Written {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = PackageWriter::create(path).unwrap();
    let mut tensors = BTreeMap::new();
    let mut q4 = HashMap::new();

    // Plain tensors of every dtype, odd lengths included.
    let pos = random_f32(&mut rng, 9 * 5);
    w.add_f32("pos_embed.pos_embed", &[1, 9, 5], &pos).unwrap();
    expect(
        &mut tensors,
        "pos_embed.pos_embed",
        Dtype::F32,
        &[1, 9, 5],
        bytemuck::cast_slice(&pos),
    );

    let odd: Vec<u8> = (0..13).map(|_| rng.random_range(0..=255u8)).collect();
    w.add_u8("odd.bytes", &[13], &odd).unwrap();
    expect(&mut tensors, "odd.bytes", Dtype::U8, &[13], &odd);

    let norm: Vec<f16> = random_f32(&mut rng, 7)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    w.add_f16("norm_out.norm.weight", &[7], &norm).unwrap();
    expect(
        &mut tensors,
        "norm_out.norm.weight",
        Dtype::F16,
        &[7],
        bytemuck::cast_slice(&norm),
    );

    let conv: Vec<bf16> = random_f32(&mut rng, 3 * 2 * 3)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    w.add_bf16("pos_embed.proj.weight", &[3, 2, 3, 1], &conv)
        .unwrap();
    expect(
        &mut tensors,
        "pos_embed.proj.weight",
        Dtype::Bf16,
        &[3, 2, 3, 1],
        bytemuck::cast_slice(&conv),
    );

    w.add_f32("empty", &[0, 3], &[]).unwrap();
    expect(&mut tensors, "empty", Dtype::F32, &[0, 3], &[]);

    // 4-bit layers with awkward N and every group size.
    let q4_specs: &[(&str, Q4Kind, usize, usize, usize, bool)] = &[
        (
            "transformer_blocks.0.attn.to_q",
            Q4Kind::Int4,
            7,
            96,
            32,
            true,
        ),
        (
            "transformer_blocks.0.attn.to_k",
            Q4Kind::Int4,
            13,
            192,
            64,
            false,
        ),
        (
            "transformer_blocks.5.ff.net.2",
            Q4Kind::Int4,
            1,
            384,
            128,
            true,
        ),
        (
            "transformer_blocks.6.attn.to_q",
            Q4Kind::Int4Sym,
            9,
            192,
            64,
            true,
        ),
        (
            "transformer_blocks.6.attn.to_k",
            Q4Kind::Int4Sym,
            1,
            128,
            128,
            false,
        ),
        (
            "transformer_blocks.5.attn.to_v",
            Q4Kind::Nf4,
            5,
            64,
            32,
            false,
        ),
        (
            "transformer_blocks.23.attn.to_out.0",
            Q4Kind::Nf4,
            11,
            256,
            64,
            true,
        ),
        (
            "transformer_blocks.23.ff.net.0.proj",
            Q4Kind::Nf4,
            3,
            128,
            128,
            false,
        ),
    ];
    for &(name, kind, n, k, group, with_bias) in q4_specs {
        let m = random_q4(&mut rng, kind, n, k, group);
        let bias = with_bias.then(|| random_f32(&mut rng, n));
        w.add_q4_layer(name, &m, bias.as_deref()).unwrap();
        let g = k / group;
        expect(
            &mut tensors,
            &format!("{name}.qweight"),
            Dtype::U8,
            &[n, k / 2],
            &m.packed,
        );
        let scales_name = if kind == Q4Kind::Nf4 {
            "absmax"
        } else {
            "scales"
        };
        expect(
            &mut tensors,
            &format!("{name}.{scales_name}"),
            Dtype::F16,
            &[n, g],
            bytemuck::cast_slice(&m.scales),
        );
        if kind.has_offsets() {
            expect(
                &mut tensors,
                &format!("{name}.offsets"),
                Dtype::F16,
                &[n, g],
                bytemuck::cast_slice(&m.offsets),
            );
        }
        if let Some(b) = &bias {
            expect(
                &mut tensors,
                &format!("{name}.bias"),
                Dtype::F32,
                &[n],
                bytemuck::cast_slice(b),
            );
        }
        q4.insert(name.to_string(), (m, bias));
    }

    // Dense layers in each float dtype.
    let (n, k) = (6, 10);
    let wf32 = random_f32(&mut rng, n * k);
    let bias = random_f32(&mut rng, n);
    w.add_dense_layer(
        "context_embedder",
        Precision::F32,
        n,
        k,
        bytemuck::cast_slice(&wf32),
        Some(&bias),
    )
    .unwrap();
    expect(
        &mut tensors,
        "context_embedder.weight",
        Dtype::F32,
        &[n, k],
        bytemuck::cast_slice(&wf32),
    );
    expect(
        &mut tensors,
        "context_embedder.bias",
        Dtype::F32,
        &[n],
        bytemuck::cast_slice(&bias),
    );

    let wf16: Vec<f16> = random_f32(&mut rng, 3 * 5)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    w.add_dense_layer(
        "proj_out",
        Precision::F16,
        3,
        5,
        bytemuck::cast_slice(&wf16),
        None,
    )
    .unwrap();
    expect(
        &mut tensors,
        "proj_out.weight",
        Dtype::F16,
        &[3, 5],
        bytemuck::cast_slice(&wf16),
    );

    let wbf16: Vec<bf16> = random_f32(&mut rng, 4 * 9)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let bias4 = random_f32(&mut rng, 4);
    w.add_dense_layer(
        "time_text_embed.timestep_embedder.linear_1",
        Precision::Bf16,
        4,
        9,
        bytemuck::cast_slice(&wbf16),
        Some(&bias4),
    )
    .unwrap();
    expect(
        &mut tensors,
        "time_text_embed.timestep_embedder.linear_1.weight",
        Dtype::Bf16,
        &[4, 9],
        bytemuck::cast_slice(&wbf16),
    );
    expect(
        &mut tensors,
        "time_text_embed.timestep_embedder.linear_1.bias",
        Dtype::F32,
        &[4],
        bytemuck::cast_slice(&bias4),
    );

    // A layer assembled by hand: BF16 weight with an F16 bias.
    let hand_w: Vec<bf16> = random_f32(&mut rng, 2 * 3)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let hand_b: Vec<f16> = random_f32(&mut rng, 2)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    w.add_bf16("norm1.linear.weight", &[2, 3], &hand_w).unwrap();
    w.add_f16("norm1.linear.bias", &[2], &hand_b).unwrap();
    w.add_layer_entry(LayerEntry {
        name: "norm1.linear".into(),
        precision: Precision::Bf16,
        out_features: 2,
        in_features: 3,
        has_bias: true,
    })
    .unwrap();
    expect(
        &mut tensors,
        "norm1.linear.weight",
        Dtype::Bf16,
        &[2, 3],
        bytemuck::cast_slice(&hand_w),
    );
    expect(
        &mut tensors,
        "norm1.linear.bias",
        Dtype::F16,
        &[2],
        bytemuck::cast_slice(&hand_b),
    );

    let info = PackageInfo {
        architecture: Some(MmditConfig::sd35_medium()),
        kept_blocks: vec![0, 1, 5, 23],
        provenance: Provenance {
            source: "sd3.5-medium".into(),
            source_bytes: 4_939_212_345,
            tool_version: hiprune::VERSION.into(),
            quantizer: "rtn-asymmetric g64".into(),
            plan_summary: "keep 4 of 24 blocks".into(),
            sensitivity: random_f32(&mut rng, 24),
            distillation_weights: vec![0.5; 4],
        },
        removed_components: vec![hiprune::format::ComponentCut {
            block: 5,
            components: vec!["attn2".into(), "ff_context".into()],
        }],
    };
    let out = w.finish(info.clone()).unwrap();
    assert_eq!(out, path);
    Written { tensors, q4, info }
}

#[test]
fn mixed_package_roundtrips_bytes_views_and_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.hpk");
    let written = write_mixed(&path, 0x5eed_0001);
    let pkg = Package::open(&path).unwrap();

    assert_eq!(pkg.path(), path);
    assert_eq!(pkg.file_len(), std::fs::metadata(&path).unwrap().len());
    assert_eq!(pkg.metadata()["format"], FORMAT_NAME);
    assert_eq!(pkg.metadata()["format_version"], "2");

    let m = pkg.manifest();
    assert_eq!(m.format_version, 2);
    assert_eq!(m.architecture, written.info.architecture);
    assert_eq!(m.kept_blocks, written.info.kept_blocks);
    assert_eq!(m.provenance, written.info.provenance);
    assert_eq!(m.removed_components, written.info.removed_components);
    assert_eq!(m.tensors.len(), written.tensors.len());
    assert_eq!(m.layers.len(), written.q4.len() + 4);

    let mut names: Vec<&str> = pkg.tensor_names().collect();
    names.sort_unstable();
    let expected_names: Vec<&str> = written.tensors.keys().map(String::as_str).collect();
    assert_eq!(names, expected_names);
    assert!(!pkg.contains("nope") && pkg.contains(MANIFEST_TENSOR));

    for (name, e) in &written.tensors {
        let v = pkg.tensor(name).unwrap();
        assert_eq!(v.name(), name);
        assert_eq!(v.dtype(), e.dtype, "{name}");
        assert_eq!(v.shape(), e.shape.as_slice(), "{name}");
        assert_eq!(v.bytes(), e.bytes.as_slice(), "{name}");
        assert_eq!(v.len(), e.bytes.len() / e.dtype.size());
        assert_eq!(
            v.bytes().as_ptr() as usize % e.dtype.size(),
            0,
            "{name} misaligned in memory"
        );
        match e.dtype {
            Dtype::F32 => {
                let s = v.f32_slice().unwrap();
                assert_eq!(bytemuck::cast_slice::<f32, u8>(s), e.bytes.as_slice());
                assert_eq!(v.to_f32_vec().unwrap(), s.to_vec());
            }
            Dtype::F16 => {
                let s = v.f16_slice().unwrap();
                let back: Vec<f32> = s.iter().map(|x| x.to_f32()).collect();
                assert_eq!(v.to_f32_vec().unwrap(), back);
            }
            Dtype::Bf16 => {
                let s = v.bf16_slice().unwrap();
                let back: Vec<f32> = s.iter().map(|x| x.to_f32()).collect();
                assert_eq!(v.to_f32_vec().unwrap(), back);
            }
            Dtype::U8 => assert_eq!(v.u8_slice().unwrap(), e.bytes.as_slice()),
        }
        pkg.verify_tensor(name).unwrap();
    }
    pkg.verify().unwrap();

    for (name, (mat, bias)) in &written.q4 {
        let q = pkg.q4_layer(name).unwrap();
        assert_eq!(
            (q.kind(), q.n(), q.k(), q.group()),
            (mat.kind, mat.n, mat.k, mat.group)
        );
        assert_eq!(q.packed(), mat.packed.as_slice());
        assert_eq!(q.scales(), mat.scales.as_slice());
        assert_eq!(q.offsets(), mat.offsets.as_slice());
        // Zero-copy: the codes are the very bytes of the tensor view.
        let packed_view = pkg.tensor(&format!("{name}.qweight")).unwrap();
        assert_eq!(q.packed().as_ptr(), packed_view.bytes().as_ptr());
        assert_eq!(
            reference::dequantize(&q),
            reference::dequantize(&mat.view().unwrap())
        );

        let layer = pkg.layer(name).unwrap();
        assert_eq!(layer.has_bias, bias.is_some());
        match (pkg.bias(name).unwrap(), bias) {
            (Some(v), Some(b)) => assert_eq!(v.f32_slice().unwrap(), b.as_slice()),
            (None, None) => {}
            _ => panic!("bias of {name} differs"),
        }
        assert!(matches!(
            pkg.dense_weight(name),
            Err(Error::InvalidArgument { .. })
        ));
    }

    let dense = pkg.dense_weight("context_embedder").unwrap();
    assert_eq!(dense.shape(), &[6, 10]);
    assert_eq!(pkg.layer("proj_out").unwrap().precision, Precision::F16);
    assert!(pkg.bias("proj_out").unwrap().is_none());
    let hand_bias = pkg.bias("norm1.linear").unwrap().unwrap();
    assert_eq!(hand_bias.dtype(), Dtype::F16);
    assert!(matches!(
        pkg.q4_layer("proj_out"),
        Err(Error::InvalidArgument { what, .. }) if what.contains("proj_out")
    ));
}

#[test]
fn every_tensor_is_aligned_and_offsets_are_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aligned.hpk");
    write_mixed(&path, 0x5eed_0002);
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0, "data section must start 8-aligned");
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut ranges = Vec::new();
    for (name, t) in &header {
        if name == "__metadata__" {
            continue;
        }
        let size = match t["dtype"].as_str().unwrap() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            "U8" => 1,
            other => panic!("unexpected dtype {other}"),
        };
        let begin = t["data_offsets"][0].as_u64().unwrap() as usize;
        let end = t["data_offsets"][1].as_u64().unwrap() as usize;
        assert_eq!((8 + n + begin) % size, 0, "{name} misaligned in the file");
        ranges.push((begin, end, name.clone()));
    }
    ranges.sort();
    let mut at = 0;
    for (begin, end, name) in &ranges {
        assert_eq!(*begin, at, "{name} not contiguous");
        at = *end;
    }
    assert_eq!(8 + n + at, bytes.len());
    // The manifest is written last.
    assert_eq!(ranges.last().unwrap().2, MANIFEST_TENSOR);
}

#[test]
fn package_is_readable_by_the_safetensors_crate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("interop.hpk");
    let written = write_mixed(&path, 0x5eed_0003);
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), written.tensors.len() + 1);
    for (name, e) in &written.tensors {
        let v = st.tensor(name).unwrap();
        assert_eq!(v.shape(), e.shape.as_slice(), "{name}");
        assert_eq!(v.data(), e.bytes.as_slice(), "{name}");
        assert_eq!(format!("{:?}", v.dtype()), e.dtype.name(), "{name}");
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["format"], "hiprune");
    assert_eq!(meta["format_version"], "2");
    assert_eq!(meta["manifest_crc32"].len(), 8);
}

#[test]
fn random_packages_roundtrip() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0004);
    let dir = tempfile::tempdir().unwrap();
    for round in 0..6 {
        let path = dir.path().join(format!("random-{round}.hpk"));
        let mut w = PackageWriter::create(&path).unwrap();
        let mut expected = Vec::new();
        let count = rng.random_range(0..40);
        for i in 0..count {
            let dtype = [Dtype::U8, Dtype::F16, Dtype::Bf16, Dtype::F32][rng.random_range(0..4)];
            let rank = rng.random_range(0..4);
            let shape: Vec<usize> = (0..rank).map(|_| rng.random_range(0..8)).collect();
            let len = shape.iter().product::<usize>() * dtype.size();
            let bytes: Vec<u8> = (0..len).map(|_| rng.random_range(0..=255u8)).collect();
            let name = format!("t{i}.{}", rng.random_range(0..1000));
            w.add_tensor(&name, dtype, &shape, &bytes).unwrap();
            expected.push((name, dtype, shape, bytes));
        }
        assert_eq!(w.tensor_count(), count);
        w.finish(PackageInfo::default()).unwrap();
        let pkg = Package::open(&path).unwrap();
        pkg.verify().unwrap();
        assert_eq!(pkg.tensor_names().count(), count);
        for (name, dtype, shape, bytes) in &expected {
            let v = pkg.tensor(name).unwrap();
            assert_eq!(
                (v.dtype(), v.shape(), v.bytes()),
                (*dtype, shape.as_slice(), bytes.as_slice())
            );
            assert_eq!(v.bytes().as_ptr() as usize % dtype.size(), 0);
        }
    }
}

#[test]
fn empty_package_roundtrips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.hpk");
    PackageWriter::create(&path)
        .unwrap()
        .finish(PackageInfo::default())
        .unwrap();
    let pkg = Package::open(&path).unwrap();
    assert_eq!(pkg.tensor_names().count(), 0);
    assert!(pkg.manifest().layers.is_empty());
    assert!(pkg.manifest().architecture.is_none());
    pkg.verify().unwrap();
    assert!(matches!(pkg.tensor("x"), Err(Error::MissingTensor { tensor }) if tensor == "x"));
    assert!(matches!(pkg.layer("l"), Err(Error::MissingLayer { layer }) if layer == "l"));
    assert!(matches!(pkg.q4_layer("l"), Err(Error::MissingLayer { .. })));
    assert!(matches!(
        pkg.verify_tensor("x"),
        Err(Error::MissingTensor { .. })
    ));
}

#[test]
fn finishing_over_an_existing_file_replaces_it_and_leaves_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.hpk");
    let mut w = PackageWriter::create(&path).unwrap();
    w.add_f32("a", &[2], &[1.0, 2.0]).unwrap();
    w.finish(PackageInfo::default()).unwrap();
    // While the first package is open, a second one replaces it.
    let first = Package::open(&path).unwrap();
    let mut w = PackageWriter::create(&path).unwrap();
    w.add_f32("b", &[3], &[3.0, 4.0, 5.0]).unwrap();
    w.finish(PackageInfo::default()).unwrap();
    let second = Package::open(&path).unwrap();
    assert_eq!(first.tensor("a").unwrap().f32_slice().unwrap(), &[1.0, 2.0]);
    assert_eq!(
        second.tensor("b").unwrap().f32_slice().unwrap(),
        &[3.0, 4.0, 5.0]
    );
    assert!(!second.contains("a"));
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries, vec!["model.hpk".to_string()]);
}

#[test]
fn typed_views_check_the_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("views.hpk");
    let mut w = PackageWriter::create(&path).unwrap();
    w.add_f32("f", &[2], &[1.0, -1.0]).unwrap();
    w.add_u8("u", &[3], &[1, 2, 3]).unwrap();
    w.finish(PackageInfo::default()).unwrap();
    let pkg = Package::open(&path).unwrap();
    let f = pkg.tensor("f").unwrap();
    for err in [
        f.f16_slice().err(),
        f.bf16_slice().err(),
        f.u8_slice().err(),
    ] {
        assert!(matches!(
            err,
            Some(Error::DtypeMismatch { tensor, found, .. }) if tensor == "f" && found == "F32"
        ));
    }
    let u = pkg.tensor("u").unwrap();
    assert!(
        matches!(u.f32_slice(), Err(Error::DtypeMismatch { expected, .. }) if expected == "F32")
    );
    assert!(matches!(u.to_f32_vec(), Err(Error::DtypeMismatch { .. })));
}

#[test]
fn writer_rejects_bad_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = PackageWriter::create(dir.path().join("bad.hpk")).unwrap();
    w.add_f32("x", &[2], &[0.0, 1.0]).unwrap();
    assert!(
        matches!(w.add_f32("x", &[1], &[0.0]), Err(Error::InvalidArgument { what, .. }) if what.contains("`x`"))
    );
    assert!(matches!(
        w.add_u8(MANIFEST_TENSOR, &[1], &[0]),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        w.add_u8("__metadata__", &[1], &[0]),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        w.add_u8("", &[1], &[0]),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        w.add_f32("y", &[2, 3], &[0.0; 5]),
        Err(Error::LengthMismatch {
            expected: 24,
            found: 20,
            ..
        })
    ));
    assert!(matches!(
        w.add_tensor("z", Dtype::F32, &[1 << 40, 1 << 40], &[]),
        Err(Error::SizeOverflow { tensor, .. }) if tensor == "z"
    ));
    // Rejected tensors were not recorded.
    assert_eq!(w.tensor_count(), 1);
    let path = w.finish(PackageInfo::default()).unwrap();
    let pkg = Package::open(path).unwrap();
    assert_eq!(pkg.tensor_names().collect::<Vec<_>>(), vec!["x"]);
}

#[test]
fn writer_rejects_bad_layers() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0005);
    let dir = tempfile::tempdir().unwrap();
    let mut w = PackageWriter::create(dir.path().join("layers.hpk")).unwrap();

    let mut m = random_q4(&mut rng, Q4Kind::Int4, 3, 96, 32);
    m.group = 48;
    assert!(
        matches!(w.add_q4_layer("g", &m, None), Err(Error::InvalidGroupSize { layer, group: 48, .. }) if layer == "g")
    );
    let m = random_q4(&mut rng, Q4Kind::Nf4, 3, 64, 64);
    let mut bad_k = m.clone();
    bad_k.k = 96;
    assert!(matches!(
        w.add_q4_layer("k", &bad_k, None),
        Err(Error::GroupDoesNotDivide { k: 96, .. })
    ));
    let mut short = m.clone();
    short.scales.pop();
    assert!(matches!(
        w.add_q4_layer("s", &short, None),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        w.add_q4_layer("b", &m, Some(&[0.0; 2])),
        Err(Error::LengthMismatch {
            expected: 3,
            found: 2,
            ..
        })
    ));
    w.add_q4_layer("ok", &m, None).unwrap();
    assert!(matches!(
        w.add_q4_layer("ok", &m, None),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        w.add_dense_layer("d", Precision::Int4 { group: 64 }, 2, 2, &[0; 4], None),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        w.add_dense_layer("d", Precision::F16, 2, 3, &[0; 10], None),
        Err(Error::LengthMismatch {
            expected: 12,
            found: 10,
            ..
        })
    ));
    assert_eq!(
        w.tensor_count(),
        2,
        "failed layer adds must not leave tensors behind"
    );
    let pkg = Package::open(w.finish(PackageInfo::default()).unwrap()).unwrap();
    assert_eq!(pkg.manifest().layers.len(), 1);
}

#[test]
fn finish_checks_recorded_layers_and_leaves_nothing_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checked.hpk");

    // An INT4 layer whose qweight was stored as F16.
    let mut w = PackageWriter::create(&path).unwrap();
    w.add_f16("l.qweight", &[2, 16], &[f16::ZERO; 32]).unwrap();
    w.add_f16("l.scales", &[2, 1], &[f16::ONE; 2]).unwrap();
    w.add_f16("l.offsets", &[2, 1], &[f16::ZERO; 2]).unwrap();
    w.add_layer_entry(LayerEntry {
        name: "l".into(),
        precision: Precision::Int4 { group: 64 },
        out_features: 2,
        in_features: 64,
        has_bias: false,
    })
    .unwrap();
    assert!(matches!(
        w.finish(PackageInfo::default()),
        Err(Error::DtypeMismatch { tensor, expected, found }) if tensor == "l.qweight" && expected == "U8" && found == "F16"
    ));
    assert!(!path.exists());

    // A layer entry without its tensors.
    let mut w = PackageWriter::create(&path).unwrap();
    w.add_layer_entry(LayerEntry {
        name: "gone".into(),
        precision: Precision::F32,
        out_features: 1,
        in_features: 1,
        has_bias: false,
    })
    .unwrap();
    assert!(
        matches!(w.finish(PackageInfo::default()), Err(Error::MissingTensor { tensor }) if tensor == "gone.weight")
    );

    // kept_blocks beyond the architecture.
    let mut w = PackageWriter::create(&path).unwrap();
    w.add_f32("a", &[1], &[1.0]).unwrap();
    let info = PackageInfo {
        architecture: Some(MmditConfig::sd35_medium()),
        kept_blocks: vec![0, 24],
        ..Default::default()
    };
    assert!(
        matches!(w.finish(info), Err(Error::InvalidArgument { what, .. }) if what.contains("kept_blocks"))
    );

    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temp files left behind"
    );
}

/// Found by the `manifest_decode` fuzz target (a harness assumption, not a library
/// fault): float fields of the manifest may hold NaN, so a decoded manifest is compared
/// with its re-encoding as bytes, never with `==`.
#[test]
fn manifest_with_nan_floats_roundtrips_as_bytes() {
    use hiprune::format::{FORMAT_VERSION, Manifest, Provenance};
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        architecture: None,
        kept_blocks: vec![0, 2],
        layers: Vec::new(),
        tensors: Vec::new(),
        provenance: Provenance {
            distillation_weights: vec![7.6e-6, f32::NAN, 3.6e-43, 0.0],
            sensitivity: vec![f32::INFINITY],
            ..Provenance::default()
        },
        removed_components: Vec::new(),
    };
    let bytes = manifest.encode().unwrap();
    let decoded = Manifest::decode(&bytes).unwrap();
    assert_ne!(
        decoded, manifest,
        "NaN != NaN: structural equality cannot be the check"
    );
    assert_eq!(decoded.encode().unwrap(), bytes);
    assert!(decoded.provenance.distillation_weights[1].is_nan());
}

/// A version-1 manifest re-encodes in the version-1 layout (found by fuzzing).
#[test]
fn version_1_manifests_reencode_as_version_1() {
    use hiprune::format::{ComponentCut, Manifest, Provenance};
    let mut m = Manifest {
        format_version: 1,
        architecture: None,
        kept_blocks: vec![0, 2],
        layers: Vec::new(),
        tensors: Vec::new(),
        provenance: Provenance::default(),
        removed_components: Vec::new(),
    };
    let v1 = m.encode().unwrap();
    m.format_version = 2;
    let v2 = m.encode().unwrap();
    assert_eq!(v1.len() + 1, v2.len(), "v2 adds one empty list");
    let back = Manifest::decode(&v1).unwrap();
    assert_eq!(back.format_version, 1);
    assert_eq!(back.encode().unwrap(), v1);
    m.format_version = 1;
    m.removed_components = vec![ComponentCut {
        block: 0,
        components: vec!["ff".into()],
    }];
    assert!(m.encode().is_err());
}
