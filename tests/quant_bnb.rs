//! Import of bitsandbytes NF4 layers, checked against bitsandbytes' own dequantisation.
//!
//! The fixture `tests/fixtures/bnb/nf4_layers.safetensors` was written by
//! `tests/fixtures/bnb/make_bnb_nf4.py` with real bitsandbytes on the CPU; each layer
//! `<w>` holds bitsandbytes' saved tensors plus `<w>.expected`, its dequantised weight.

use std::collections::BTreeMap;

use half::f16;
use hiprune::Error;
use hiprune::quant::reference::dequantize;
use hiprune::quant::{NF4_CODEBOOK, Q4Kind, import_bnb_nf4, quantize_nf4};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

const TO_Q: &str = "transformer_blocks.0.attn.to_q.weight"; // [68, 128], block 32, nested
const TO_K: &str = "transformer_blocks.0.attn.to_k.weight"; // [40, 192], block 64, plain
const TO_V: &str = "transformer_blocks.0.attn.to_v.weight"; // [24, 128], block 128, plain
const FF0: &str = "transformer_blocks.1.ff.net.0.proj.weight"; // [16, 512], block 256, nested
const FP4: &str = "transformer_blocks.1.ff.net.2.weight"; // [8, 64], FP4

fn fixture() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bnb/nf4_layers.safetensors"
    );
    std::fs::read(path).expect("fixture present (see tests/fixtures/bnb/make_bnb_nf4.py)")
}

fn read_f32(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let v = st.tensor(name).unwrap();
    assert_eq!(v.dtype(), Dtype::F32);
    v.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Checks the import of `name` against bitsandbytes' dequantisation.
fn check_layer(name: &str, n: usize, k: usize, group: usize) {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let m = import_bnb_nf4(&st, name).unwrap();
    assert_eq!(m.kind, Q4Kind::Nf4);
    assert_eq!((m.n, m.k, m.group), (n, k, group));
    assert_eq!(m.scales.len(), n * k / group);
    assert!(m.offsets.is_empty());
    let d = dequantize(&m.view().unwrap());
    let expected = read_f32(&st, &format!("{name}.expected"));
    assert_eq!(expected.len(), n * k);
    let mut max_rel = 0f64;
    for (i, (&e, &x)) in expected.iter().zip(&d).enumerate() {
        let e = f64::from(e);
        // Only the absmax is rounded (to f16): relative error at most 2^-11.
        let tol = e.abs() * (2f64.powi(-11) * 1.001) + 1e-12;
        assert!(
            (x - e).abs() <= tol,
            "{name} [{}, {}]: hiprune {x} vs bitsandbytes {e}",
            i / k,
            i % k
        );
        if e != 0.0 {
            max_rel = max_rel.max((x - e).abs() / e.abs());
        }
    }
    // Sanity: the comparison is not vacuous.
    assert!(expected.iter().filter(|v| **v != 0.0).count() > n * k / 2);
    assert!(max_rel < 2f64.powi(-11) * 1.001);
}

#[test]
fn bnb_plain_absmax_block64_matches_bitsandbytes() {
    check_layer(TO_K, 40, 192, 64);
}

#[test]
fn bnb_plain_absmax_block128_matches_bitsandbytes() {
    check_layer(TO_V, 24, 128, 128);
}

#[test]
fn bnb_double_quantised_block32_matches_bitsandbytes() {
    // 272 blocks: two nested absmax blocks of 256, the second partial.
    check_layer(TO_Q, 68, 128, 32);
}

#[test]
fn bnb_double_quantised_block256_becomes_group128() {
    check_layer(FF0, 16, 512, 128);
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let m = import_bnb_nf4(&st, FF0).unwrap();
    // Each 256-block's absmax is repeated for its two 128-groups.
    for pair in m.scales.chunks_exact(2) {
        assert_eq!(pair[0], pair[1]);
    }
}

/// hiprune's own NF4 quantiser chooses the same codes as bitsandbytes did on the
/// original weights, except where a value sits on a midpoint to within the f16
/// rounding of the absmax.
#[test]
fn bnb_codes_agree_with_hiprune_nf4_quantiser() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let original = read_f32(&st, &format!("{TO_K}.original"));
    let absmax = read_f32(&st, &format!("{TO_K}.absmax"));
    let (n, k, b) = (40, 192, 64);
    let ours = quantize_nf4(&original, n, k, b).unwrap();
    let imported = import_bnb_nf4(&st, TO_K).unwrap();
    assert_eq!(
        ours.scales, imported.scales,
        "absmax must agree after f16 rounding"
    );
    let code = |p: &[u8], i: usize| {
        if i.is_multiple_of(2) {
            p[i / 2] & 15
        } else {
            p[i / 2] >> 4
        }
    };
    let mut differ = 0;
    for i in 0..n * k {
        let (a, c) = (code(&ours.packed, i), code(&imported.packed, i));
        if a != c {
            differ += 1;
            let x = original[i] / absmax[i / b];
            let near_mid = NF4_CODEBOOK
                .windows(2)
                .any(|w| (x - 0.5 * (w[0] + w[1])).abs() <= 1e-3);
            assert!(
                near_mid && a.abs_diff(c) == 1,
                "element {i}: code {a} vs {c}, x={x}"
            );
        }
    }
    assert!(differ <= n * k / 100, "{differ} codes differ");
    // The all-zero block of row 3.
    assert!(
        imported.packed[3 * k / 2..3 * k / 2 + 32]
            .iter()
            .all(|&b| b == 0x77)
    );
    assert_eq!(imported.scales[3 * (k / b)], f16::ZERO);
}

#[test]
fn bnb_fp4_is_unsupported() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    match import_bnb_nf4(&st, FP4) {
        Err(Error::Unsupported { what }) => assert!(what.contains("FP4"), "{what}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

// ----- malformed inputs, built by editing the fixture's tensors -----

/// One tensor: dtype, shape, bytes.
type Entry = (Dtype, Vec<usize>, Vec<u8>);

/// The tensors of `layer` (all entries whose name starts with it).
fn layer_entries(layer: &str) -> BTreeMap<String, Entry> {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(name, _)| name.starts_with(layer))
        .map(|(name, v)| (name, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn serialize(entries: &BTreeMap<String, Entry>) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(name, (dtype, shape, data))| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn import_edited(
    layer: &str,
    edit: impl FnOnce(&mut BTreeMap<String, Entry>),
) -> hiprune::Result<hiprune::Q4Matrix> {
    let mut entries = layer_entries(layer);
    edit(&mut entries);
    let bytes = serialize(&entries);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    import_bnb_nf4(&st, layer)
}

fn f32_entry(values: &[f32]) -> Entry {
    let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    (Dtype::F32, vec![values.len()], data)
}

fn json_entry(json: &str) -> Entry {
    (Dtype::U8, vec![json.len()], json.as_bytes().to_vec())
}

fn state_key(layer: &str) -> String {
    format!("{layer}.quant_state.bitsandbytes__nf4")
}

/// Replaces the quant state JSON of `layer` by `f(old JSON value)`.
fn edit_json(
    entries: &mut BTreeMap<String, Entry>,
    layer: &str,
    f: impl FnOnce(&mut serde_json::Value),
) {
    let key = state_key(layer);
    let mut v: serde_json::Value = serde_json::from_slice(&entries[&key].2).unwrap();
    f(&mut v);
    entries.insert(key, json_entry(&v.to_string()));
}

#[test]
fn bnb_unedited_round_trip_imports() {
    // Rebuilding a layer without edits keeps it valid.
    assert!(import_edited(TO_Q, |_| {}).is_ok());
    assert!(import_edited(TO_K, |_| {}).is_ok());
}

#[test]
fn bnb_wrong_dtype() {
    // Plain absmax stored as F16.
    let r = import_edited(TO_K, |e| {
        let (_, shape, data) = e[&format!("{TO_K}.absmax")].clone();
        e.insert(
            format!("{TO_K}.absmax"),
            (Dtype::F16, vec![shape[0] * 2], data),
        );
    });
    assert!(
        matches!(r, Err(Error::DtypeMismatch { ref tensor, .. }) if tensor.ends_with(".absmax")),
        "{r:?}"
    );
    // Packed weight as I8.
    let r = import_edited(TO_K, |e| e.get_mut(TO_K).unwrap().0 = Dtype::I8);
    assert!(
        matches!(r, Err(Error::DtypeMismatch { ref tensor, .. }) if tensor == TO_K),
        "{r:?}"
    );
    // Nested absmax codes as F32 (plain absmax where nested is declared).
    let r = import_edited(TO_Q, |e| {
        let n = e[&format!("{TO_Q}.absmax")].1[0];
        e.insert(format!("{TO_Q}.absmax"), f32_entry(&vec![0.5; n]));
    });
    assert!(matches!(r, Err(Error::DtypeMismatch { .. })), "{r:?}");
    // Quant state JSON stored as F32.
    let r = import_edited(TO_K, |e| {
        let k = state_key(TO_K);
        let (_, _, data) = e[&k].clone();
        let data = data[..data.len() / 4 * 4].to_vec();
        e.insert(k, (Dtype::F32, vec![data.len() / 4], data));
    });
    assert!(matches!(r, Err(Error::DtypeMismatch { .. })), "{r:?}");
}

#[test]
fn bnb_wrong_length() {
    // One absmax short.
    let r = import_edited(TO_K, |e| {
        let a = e.get_mut(&format!("{TO_K}.absmax")).unwrap();
        a.1[0] -= 1;
        a.2.truncate(a.2.len() - 4);
    });
    assert!(
        matches!(
            r,
            Err(Error::LengthMismatch {
                expected: 120,
                found: 119,
                ..
            })
        ),
        "{r:?}"
    );
    // Packed codes one byte short.
    let r = import_edited(TO_Q, |e| {
        let w = e.get_mut(TO_Q).unwrap();
        w.1[0] -= 1;
        w.2.pop();
    });
    assert!(matches!(r, Err(Error::LengthMismatch { .. })), "{r:?}");
    // Nested quant map of 255 entries; nested absmax with one entry too many.
    let r = import_edited(TO_Q, |e| {
        let m = e.get_mut(&format!("{TO_Q}.nested_quant_map")).unwrap();
        m.1[0] -= 1;
        m.2.truncate(m.2.len() - 4);
    });
    assert!(
        matches!(r, Err(Error::LengthMismatch { expected: 256, .. })),
        "{r:?}"
    );
    let r = import_edited(TO_Q, |e| {
        e.insert(format!("{TO_Q}.nested_absmax"), f32_entry(&[1.0, 1.0, 1.0]));
    });
    assert!(
        matches!(
            r,
            Err(Error::LengthMismatch {
                expected: 2,
                found: 3,
                ..
            })
        ),
        "{r:?}"
    );
    // Quant map of 15 levels.
    let r = import_edited(TO_K, |e| {
        e.insert(format!("{TO_K}.quant_map"), f32_entry(&NF4_CODEBOOK[..15]));
    });
    assert!(
        matches!(r, Err(Error::LengthMismatch { expected: 16, .. })),
        "{r:?}"
    );
}

#[test]
fn bnb_missing_tensors() {
    for (layer, suffix) in [
        (TO_K, ".absmax"),
        (TO_K, ".quant_map"),
        (TO_K, ""),
        (TO_Q, ".nested_quant_map"),
        (TO_Q, ".absmax"),
        (TO_Q, ".nested_absmax"),
        (TO_K, ".quant_state.bitsandbytes__nf4"),
    ] {
        let name = format!("{layer}{suffix}");
        let r = import_edited(layer, |e| {
            e.remove(&name);
        });
        assert!(
            matches!(r, Err(Error::MissingTensor { ref tensor }) if *tensor == name),
            "{name}: {r:?}"
        );
    }
    // A layer that is not there at all.
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(matches!(
        import_bnb_nf4(&st, "transformer_blocks.9.attn.to_q.weight"),
        Err(Error::MissingTensor { .. })
    ));
}

#[test]
fn bnb_non_nf4_quant_map() {
    // A perturbed codebook.
    let r = import_edited(TO_K, |e| {
        let mut book = NF4_CODEBOOK;
        book[9] += 0.01;
        e.insert(format!("{TO_K}.quant_map"), f32_entry(&book));
    });
    assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
    // The FP4 codebook under an nf4 quant state.
    let fp4_map = layer_entries(FP4)[&format!("{FP4}.quant_map")].clone();
    let r = import_edited(TO_K, |e| {
        e.insert(format!("{TO_K}.quant_map"), fp4_map);
    });
    assert!(
        matches!(r, Err(Error::Unsupported { ref what }) if what.contains("FP4")),
        "{r:?}"
    );
    // NaN levels.
    let r = import_edited(TO_K, |e| {
        e.insert(format!("{TO_K}.quant_map"), f32_entry(&[f32::NAN; 16]));
    });
    assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
    // quant_type says fp4.
    let r = import_edited(TO_K, |e| {
        edit_json(e, TO_K, |v| v["quant_type"] = "fp4".into());
    });
    assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
}

#[test]
fn bnb_bad_quant_state() {
    // Not JSON.
    let r = import_edited(TO_K, |e| {
        e.insert(state_key(TO_K), json_entry("{not json"));
    });
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
    // Missing blocksize field.
    let r = import_edited(TO_K, |e| {
        edit_json(e, TO_K, |v| {
            v.as_object_mut().unwrap().remove("blocksize");
        })
    });
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
    // A block that would cross a row: K = 96 with blocks of 64.
    let r = import_edited(TO_K, |e| {
        edit_json(e, TO_K, |v| v["shape"] = serde_json::json!([80, 96]))
    });
    assert!(
        matches!(
            r,
            Err(Error::GroupDoesNotDivide {
                k: 96,
                group: 64,
                ..
            })
        ),
        "{r:?}"
    );
    // A blocksize bitsandbytes does not have.
    let r = import_edited(TO_K, |e| edit_json(e, TO_K, |v| v["blocksize"] = 48.into()));
    assert!(
        matches!(r, Err(Error::InvalidGroupSize { group: 48, .. })),
        "{r:?}"
    );
    // Not a 2-D shape; a null shape; a zero dimension.
    for shape in [
        serde_json::json!([40, 4, 48]),
        serde_json::Value::Null,
        serde_json::json!([0, 192]),
    ] {
        let r = import_edited(TO_K, |e| edit_json(e, TO_K, |v| v["shape"] = shape));
        assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
    }
    // A shape that does not match the packed codes.
    let r = import_edited(TO_K, |e| {
        edit_json(e, TO_K, |v| v["shape"] = serde_json::json!([41, 192]))
    });
    assert!(matches!(r, Err(Error::LengthMismatch { .. })), "{r:?}");
    // Huge shape: no overflow panic.
    let r = import_edited(TO_K, |e| {
        edit_json(e, TO_K, |v| {
            v["shape"] = serde_json::json!([u64::MAX / 64, 128])
        })
    });
    assert!(r.is_err(), "{r:?}");
    // Nested tensors present but the JSON lacks the nested fields, and vice versa.
    let r = import_edited(TO_Q, |e| {
        edit_json(e, TO_Q, |v| {
            let o = v.as_object_mut().unwrap();
            o.remove("nested_offset");
            o.remove("nested_blocksize");
        })
    });
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
    let r = import_edited(TO_Q, |e| {
        edit_json(e, TO_Q, |v| v["nested_blocksize"] = 0.into())
    });
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
}

#[test]
fn bnb_non_finite_absmax() {
    let r = import_edited(TO_K, |e| {
        let mut a: Vec<f32> = vec![0.1; 120];
        a[17] = f32::NAN;
        e.insert(format!("{TO_K}.absmax"), f32_entry(&a));
    });
    assert!(
        matches!(r, Err(Error::InvalidArgument { ref reason, .. }) if reason.contains("block 17")),
        "{r:?}"
    );
    // Finite in f32 but not in f16.
    let r = import_edited(TO_K, |e| {
        let mut a: Vec<f32> = vec![0.1; 120];
        a[3] = 1.0e6;
        e.insert(format!("{TO_K}.absmax"), f32_entry(&a));
    });
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
}
