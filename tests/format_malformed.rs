//! Malformed packages: each broken rule is rejected by `Package::open` (or `verify`)
//! with its own typed error. Every bad file is made by editing the bytes or the header
//! of a valid package.

use std::path::{Path, PathBuf};

use half::f16;
use hiprune::format::{
    MANIFEST_TENSOR, MAX_HEADER_BYTES, MAX_TENSORS, Manifest, Package, PackageInfo, PackageWriter,
    Precision,
};
use hiprune::model::MmditConfig;
use hiprune::{Error, Q4Kind, Q4Matrix, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

const Q4_LAYER: &str = "transformer_blocks.3.attn.to_q";
const NF4_LAYER: &str = "transformer_blocks.7.ff.net.2";

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
            .map(|_| f16::from_f32(rng.random_range(0.01f32..0.1)))
            .collect(),
        offsets: if kind == Q4Kind::Int4 {
            (0..groups)
                .map(|_| f16::from_f32(rng.random_range(-1.0f32..0.0)))
                .collect()
        } else {
            Vec::new()
        },
    }
}

/// Writes a small valid package (F32, F16, U8 tensors, an INT4 and an NF4 layer, an
/// architecture) and returns its bytes.
fn valid_package(dir: &Path) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(0xbad_0001);
    let path = dir.join("valid.hpk");
    let mut w = PackageWriter::create(&path).unwrap();
    let pos: Vec<f32> = (0..24).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    w.add_f32("pos_embed.pos_embed", &[4, 6], &pos).unwrap();
    let norm: Vec<f16> = (0..10).map(|i| f16::from_f32(i as f32)).collect();
    w.add_f16("norm_out.norm.weight", &[10], &norm).unwrap();
    let bias: Vec<f32> = (0..5).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    w.add_q4_layer(
        Q4_LAYER,
        &random_q4(&mut rng, Q4Kind::Int4, 5, 128, 64),
        Some(&bias),
    )
    .unwrap();
    w.add_q4_layer(
        NF4_LAYER,
        &random_q4(&mut rng, Q4Kind::Nf4, 3, 64, 32),
        None,
    )
    .unwrap();
    // Added last so that the U8 tensors after it (the manifest) start at an odd offset.
    w.add_u8("odd.bytes", &[5], &[1, 2, 3, 4, 5]).unwrap();
    w.finish(PackageInfo {
        architecture: Some(MmditConfig::sd35_medium()),
        kept_blocks: vec![0, 3, 7],
        ..Default::default()
    })
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    // The unedited file must open, or the edits below prove nothing.
    open_bytes(dir, &bytes).unwrap().verify().unwrap();
    let raw = Raw::parse(&bytes);
    open_bytes(dir, &raw.bytes()).unwrap().verify().unwrap();
    bytes
}

/// Writes `bytes` to a file and opens it.
fn open_bytes(dir: &Path, bytes: &[u8]) -> Result<Package> {
    let path = dir.join("edited.hpk");
    std::fs::write(&path, bytes).unwrap();
    Package::open(&path)
}

/// A package split into its JSON header and data section, for editing.
struct Raw {
    header: Map<String, Value>,
    data: Vec<u8>,
}

impl Raw {
    fn parse(bytes: &[u8]) -> Raw {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        Raw {
            header: serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
            data: bytes[8 + n..].to_vec(),
        }
    }

    /// Reassembles the file with the data section starting at `8k + shift`.
    fn bytes_shifted(&self, shift: usize) -> Vec<u8> {
        let mut header = serde_json::to_vec(&self.header).unwrap();
        while (8 + header.len()) % 8 != shift {
            header.push(b' ');
        }
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.data);
        out
    }

    fn bytes(&self) -> Vec<u8> {
        self.bytes_shifted(0)
    }

    fn tensor(&mut self, name: &str) -> &mut Map<String, Value> {
        self.header[name].as_object_mut().unwrap()
    }

    fn offsets(&self, name: &str) -> (usize, usize) {
        let o = &self.header[name]["data_offsets"];
        (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        )
    }

    /// Name of the tensor that starts at data offset `begin`.
    fn tensor_at(&self, begin: usize) -> String {
        self.header
            .keys()
            .find(|k| {
                *k != "__metadata__" && self.offsets(k).0 == begin && self.offsets(k).1 > begin
            })
            .unwrap()
            .clone()
    }

    fn manifest_bytes(&self) -> Vec<u8> {
        let (b, e) = self.offsets(MANIFEST_TENSOR);
        self.data[b..e].to_vec()
    }

    fn manifest(&self) -> Manifest {
        postcard::from_bytes(&self.manifest_bytes()).unwrap()
    }

    /// Replaces the manifest bytes (the last tensor), fixing its offsets, shape and the
    /// checksum in the metadata.
    fn set_manifest_bytes(&mut self, bytes: &[u8]) {
        let (b, e) = self.offsets(MANIFEST_TENSOR);
        assert_eq!(e, self.data.len(), "the manifest must be the last tensor");
        self.data.truncate(b);
        self.data.extend_from_slice(bytes);
        let t = self.tensor(MANIFEST_TENSOR);
        t["data_offsets"] = json!([b, b + bytes.len()]);
        t["shape"] = json!([bytes.len()]);
        self.header["__metadata__"]["manifest_crc32"] =
            json!(format!("{:08x}", crc32fast::hash(bytes)));
    }

    fn set_manifest(&mut self, m: &Manifest) {
        self.set_manifest_bytes(&postcard::to_allocvec(m).unwrap());
    }
}

#[test]
fn truncated_file_is_rejected_at_every_cut() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for cut in [0, 1, 7] {
        let r = open_bytes(dir.path(), &bytes[..cut]);
        assert!(
            matches!(r, Err(Error::FileTooShort { len, .. }) if len == cut as u64),
            "cut {cut}: {r:?}"
        );
    }
    for cut in [8, 9, 8 + n / 2, 8 + n - 1] {
        let r = open_bytes(dir.path(), &bytes[..cut]);
        assert!(
            matches!(r, Err(Error::HeaderPastEnd { .. })),
            "cut {cut}: {r:?}"
        );
    }
    let mut rng = StdRng::seed_from_u64(0xbad_0002);
    let mut cuts = vec![8 + n, 8 + n + 1, bytes.len() - 1];
    cuts.extend((0..6).map(|_| rng.random_range(8 + n..bytes.len())));
    for cut in cuts {
        let r = open_bytes(dir.path(), &bytes[..cut]);
        assert!(
            matches!(r, Err(Error::TensorOutOfBounds { .. })),
            "cut {cut}: {r:?}"
        );
    }
}

#[test]
fn header_length_past_the_end_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = valid_package(dir.path());
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&(len - 7).to_le_bytes());
    let r = open_bytes(dir.path(), &bytes);
    assert!(
        matches!(r, Err(Error::HeaderPastEnd { header_len, file_len, .. }) if header_len == len - 7 && file_len == len),
        "{r:?}"
    );
}

#[test]
fn oversized_header_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = valid_package(dir.path());
    for declared in [MAX_HEADER_BYTES + 1, u64::MAX] {
        bytes[..8].copy_from_slice(&declared.to_le_bytes());
        let r = open_bytes(dir.path(), &bytes);
        assert!(
            matches!(r, Err(Error::HeaderTooLarge { header_len, max: MAX_HEADER_BYTES, .. }) if header_len == declared),
            "{r:?}"
        );
    }
}

#[test]
fn invalid_json_header_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

    let mut broken = bytes.clone();
    let last_brace = bytes[8..8 + n].iter().rposition(|&c| c == b'}').unwrap();
    broken[8 + last_brace] = b'#';
    assert!(matches!(
        open_bytes(dir.path(), &broken),
        Err(Error::InvalidHeader { .. })
    ));

    let mut not_utf8 = bytes.clone();
    not_utf8[8 + n / 3] = 0xff;
    assert!(
        matches!(open_bytes(dir.path(), &not_utf8), Err(Error::InvalidHeader { reason, .. }) if reason.contains("UTF-8"))
    );

    let mut array = bytes.clone();
    array[8..8 + n].fill(b' ');
    array[8..10].copy_from_slice(b"[]");
    assert!(matches!(
        open_bytes(dir.path(), &array),
        Err(Error::InvalidHeader { .. })
    ));

    // Structurally wrong entries.
    let edits: [fn(&mut Raw); 6] = [
        |r| {
            r.tensor("odd.bytes").insert("extra".into(), json!(1));
        },
        |r| {
            r.tensor("odd.bytes").remove("shape");
        },
        |r| r.tensor("odd.bytes")["shape"] = json!([-5]),
        |r| r.tensor("odd.bytes")["data_offsets"] = json!([0]),
        |r| r.header["__metadata__"]["format_version"] = json!(1),
        |r| r.tensor("pos_embed.pos_embed")["dtype"] = json!("F64"),
    ];
    for (i, edit) in edits.iter().enumerate() {
        let mut raw = Raw::parse(&bytes);
        edit(&mut raw);
        let r = open_bytes(dir.path(), &raw.bytes());
        assert!(
            matches!(r, Err(Error::InvalidHeader { .. })),
            "edit {i}: {r:?}"
        );
    }

    // A tensor name given twice (the JSON map would silently keep one).
    let text = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let dup = text.replace("\"odd.bytes\"", "\"norm_out.norm.weight\"");
    let mut dup_bytes = (dup.len() as u64).to_le_bytes().to_vec();
    dup_bytes.extend_from_slice(dup.as_bytes());
    dup_bytes.extend_from_slice(&bytes[8 + n..]);
    let r = open_bytes(dir.path(), &dup_bytes);
    assert!(
        matches!(&r, Err(Error::InvalidHeader { reason, .. }) if reason.contains("twice")),
        "{r:?}"
    );
}

#[test]
fn overlapping_offsets_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = Raw::parse(&valid_package(dir.path()));
    // The second tensor in file order starts inside the first one.
    let first = raw.tensor_at(0);
    let (_, first_end) = raw.offsets(&first);
    let second = raw.tensor_at(first_end);
    let (b, e) = raw.offsets(&second);
    raw.tensor(&second)["data_offsets"] = json!([b - 4, e - 4]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::NonContiguous { tensor, start, expected }) if *tensor == second && *start == (b - 4) as u64 && *expected == b as u64),
        "{r:?}"
    );
}

#[test]
fn gap_between_tensors_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = Raw::parse(&valid_package(dir.path()));
    let first = raw.tensor_at(0);
    let (_, first_end) = raw.offsets(&first);
    let second = raw.tensor_at(first_end);
    let (b, e) = raw.offsets(&second);
    raw.tensor(&second)["data_offsets"] = json!([b + 4, e + 4]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::NonContiguous { tensor, .. }) if *tensor == second),
        "{r:?}"
    );

    // The first tensor must start at 0.
    let mut raw = Raw::parse(&valid_package(dir.path()));
    let (b, e) = raw.offsets(&first);
    raw.tensor(&first)["data_offsets"] = json!([b + 4, e + 4]);
    raw.tensor(&second)["data_offsets"] = json!([
        e + 4,
        e + 4 + (raw.offsets(&second).1 - raw.offsets(&second).0)
    ]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(
            r,
            Err(Error::NonContiguous { .. }) | Err(Error::TensorOutOfBounds { .. })
        ),
        "{r:?}"
    );
}

#[test]
fn out_of_range_offsets_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());

    let mut raw = Raw::parse(&bytes);
    let data_len = raw.data.len();
    raw.tensor("odd.bytes")["data_offsets"] = json!([data_len, data_len + 5]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::TensorOutOfBounds { tensor, data_len: d, .. }) if tensor == "odd.bytes" && *d == data_len as u64),
        "{r:?}"
    );

    let mut raw = Raw::parse(&bytes);
    let (b, e) = raw.offsets("odd.bytes");
    raw.tensor("odd.bytes")["data_offsets"] = json!([e, b]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(matches!(r, Err(Error::TensorOutOfBounds { .. })), "{r:?}");

    let mut raw = Raw::parse(&bytes);
    raw.tensor("odd.bytes")["data_offsets"] = json!([u64::MAX - 1, u64::MAX]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(matches!(r, Err(Error::TensorOutOfBounds { .. })), "{r:?}");
}

#[test]
fn byte_length_not_matching_the_shape_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = Raw::parse(&valid_package(dir.path()));
    raw.tensor("odd.bytes")["shape"] = json!([4]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::ByteLengthMismatch { tensor, expected: 4, found: 5 }) if tensor == "odd.bytes"),
        "{r:?}"
    );
}

#[test]
fn shape_times_dtype_overflow_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());
    for shape in [
        json!([1u64 << 40, 1u64 << 40]),
        json!([u64::MAX, 2]),
        json!([1u64 << 62, 0, 1u64 << 62, 5]),
    ] {
        let mut raw = Raw::parse(&bytes);
        raw.tensor("pos_embed.pos_embed")["shape"] = shape.clone();
        let r = open_bytes(dir.path(), &raw.bytes());
        if shape[1] == 0 {
            // A zero dimension makes the product 0: no overflow, just the wrong length.
            assert!(
                matches!(r, Err(Error::ByteLengthMismatch { expected: 0, .. })),
                "{r:?}"
            );
        } else {
            assert!(
                matches!(&r, Err(Error::SizeOverflow { tensor, .. }) if tensor == "pos_embed.pos_embed"),
                "{shape}: {r:?}"
            );
        }
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = valid_package(dir.path());
    bytes.extend_from_slice(&[0; 3]);
    let r = open_bytes(dir.path(), &bytes);
    assert!(
        matches!(r, Err(Error::TrailingBytes { extra: 3, .. })),
        "{r:?}"
    );
}

#[test]
fn misaligned_tensor_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::parse(&valid_package(dir.path()));
    // Data section at 8k + 2: F16 tensors stay aligned, F32 ones do not.
    let r = open_bytes(dir.path(), &raw.bytes_shifted(2));
    assert!(
        matches!(&r, Err(Error::Misaligned { align: 4, .. })),
        "{r:?}"
    );
    let r = open_bytes(dir.path(), &raw.bytes_shifted(1));
    assert!(matches!(&r, Err(Error::Misaligned { .. })), "{r:?}");
    // A shift of a whole 8 bytes keeps everything aligned.
    let mut shifted = raw.bytes();
    let n = u64::from_le_bytes(shifted[..8].try_into().unwrap()) as usize;
    shifted.splice(8 + n..8 + n, *b"        ");
    shifted[..8].copy_from_slice(&((n + 8) as u64).to_le_bytes());
    open_bytes(dir.path(), &shifted).unwrap();
}

#[test]
fn wrong_dtype_for_a_declared_int4_tensor_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = Raw::parse(&valid_package(dir.path()));
    let qweight = format!("{Q4_LAYER}.qweight");
    // Same bytes, reinterpreted as F16 [5, 32], consistently in header and manifest.
    raw.tensor(&qweight)["dtype"] = json!("F16");
    raw.tensor(&qweight)["shape"] = json!([5, 32]);
    let mut m = raw.manifest();
    let entry = m.tensors.iter_mut().find(|t| t.name == qweight).unwrap();
    entry.dtype = hiprune::format::Dtype::F16;
    entry.shape = vec![5, 32];
    raw.set_manifest(&m);
    let r = open_bytes(dir.path(), &raw.bytes_shifted(0));
    assert!(
        matches!(&r, Err(Error::DtypeMismatch { tensor, expected, found }) if *tensor == qweight && expected == "U8" && found == "F16"),
        "{r:?}"
    );
}

#[test]
fn wrong_shape_for_a_declared_layer_tensor_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = Raw::parse(&valid_package(dir.path()));
    let scales = format!("{Q4_LAYER}.scales");
    raw.tensor(&scales)["shape"] = json!([2, 5]);
    let mut m = raw.manifest();
    m.tensors
        .iter_mut()
        .find(|t| t.name == scales)
        .unwrap()
        .shape = vec![2, 5];
    raw.set_manifest(&m);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::ShapeMismatch { tensor, expected, found }) if *tensor == scales && *expected == vec![5, 2] && *found == vec![2, 5]),
        "{r:?}"
    );
}

#[test]
fn header_disagreeing_with_the_manifest_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());

    // Shape: same byte count, other shape.
    let mut raw = Raw::parse(&bytes);
    raw.tensor("pos_embed.pos_embed")["shape"] = json!([6, 4]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::ShapeMismatch { tensor, expected, found }) if tensor == "pos_embed.pos_embed" && *expected == vec![4, 6] && *found == vec![6, 4]),
        "{r:?}"
    );

    // Dtype: same element size, other dtype.
    let mut raw = Raw::parse(&bytes);
    raw.tensor("norm_out.norm.weight")["dtype"] = json!("BF16");
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::DtypeMismatch { tensor, expected, found }) if tensor == "norm_out.norm.weight" && expected == "F16" && found == "BF16"),
        "{r:?}"
    );
}

#[test]
fn undeclared_tensor_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = Raw::parse(&valid_package(dir.path()));
    let mut m = raw.manifest();
    m.tensors.retain(|t| t.name != "odd.bytes");
    raw.set_manifest(&m);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::UndeclaredTensor { tensor }) if tensor == "odd.bytes"),
        "{r:?}"
    );
}

#[test]
fn missing_tensor_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());

    let mut raw = Raw::parse(&bytes);
    let mut m = raw.manifest();
    let mut ghost = m.tensors[0].clone();
    ghost.name = "ghost".into();
    m.tensors.push(ghost);
    raw.set_manifest(&m);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::MissingTensor { tensor }) if tensor == "ghost"),
        "{r:?}"
    );

    // A layer whose bias the manifest promises but the file lacks.
    let mut raw = Raw::parse(&bytes);
    let mut m = raw.manifest();
    m.layers
        .iter_mut()
        .find(|l| l.name == NF4_LAYER)
        .unwrap()
        .has_bias = true;
    raw.set_manifest(&m);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::MissingTensor { tensor }) if *tensor == format!("{NF4_LAYER}.bias")),
        "{r:?}"
    );

    // No manifest tensor at all.
    let mut raw = Raw::parse(&bytes);
    let entry = raw.header.remove(MANIFEST_TENSOR).unwrap();
    raw.header.insert("blob".into(), entry);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::MissingTensor { tensor }) if tensor == MANIFEST_TENSOR),
        "{r:?}"
    );
}

#[test]
fn unknown_format_version_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());

    // A version-3 manifest: only its leading version is read.
    let mut raw = Raw::parse(&bytes);
    let (b, _) = raw.offsets(MANIFEST_TENSOR);
    assert_eq!(raw.data[b], 2, "postcard encodes version 2 as one byte");
    raw.data[b] = 3;
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(
            r,
            Err(Error::UnsupportedFormatVersion {
                found: 3,
                supported: 2
            })
        ),
        "{r:?}"
    );

    // A version-3 manifest whose body this reader could not decode.
    let mut raw = Raw::parse(&bytes);
    raw.set_manifest_bytes(&[3, 0xff, 0xff, 0xff]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(r, Err(Error::UnsupportedFormatVersion { found: 3, .. })),
        "{r:?}"
    );

    // The header metadata says version 7.
    let mut raw = Raw::parse(&bytes);
    raw.header["__metadata__"]["format_version"] = json!("7");
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(r, Err(Error::UnsupportedFormatVersion { found: 7, .. })),
        "{r:?}"
    );
}

#[test]
fn corrupted_manifest_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());

    // A flipped byte: caught by the manifest checksum.
    let mut raw = Raw::parse(&bytes);
    let (b, e) = raw.offsets(MANIFEST_TENSOR);
    raw.data[(b + e) / 2] ^= 0x55;
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::ManifestCorrupt { reason }) if reason.contains("CRC")),
        "{r:?}"
    );

    // Garbage with a matching checksum: caught by the decoder.
    let mut raw = Raw::parse(&bytes);
    let m = raw.manifest_bytes();
    raw.set_manifest_bytes(&m[..m.len() / 2]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(matches!(r, Err(Error::ManifestCorrupt { .. })), "{r:?}");

    // Extra bytes after a valid encoding.
    let mut raw = Raw::parse(&bytes);
    let mut m = raw.manifest_bytes();
    m.extend_from_slice(&[0, 0]);
    raw.set_manifest_bytes(&m);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::ManifestCorrupt { reason }) if reason.contains("follow")),
        "{r:?}"
    );

    // Empty manifest.
    let mut raw = Raw::parse(&bytes);
    raw.set_manifest_bytes(&[]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(matches!(r, Err(Error::ManifestCorrupt { .. })), "{r:?}");

    // The manifest tensor with two dimensions.
    let mut raw = Raw::parse(&bytes);
    let (b, e) = raw.offsets(MANIFEST_TENSOR);
    raw.tensor(MANIFEST_TENSOR)["shape"] = json!([1, e - b]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::ShapeMismatch { tensor, .. }) if tensor == MANIFEST_TENSOR),
        "{r:?}"
    );

    // The manifest tensor stored as F16, in a package where it starts 4-aligned.
    let path = dir.path().join("small.hpk");
    let mut w = PackageWriter::create(&path).unwrap();
    w.add_f32("a", &[1], &[1.0]).unwrap();
    w.finish(PackageInfo::default()).unwrap();
    let mut raw = Raw::parse(&std::fs::read(&path).unwrap());
    let mut m = raw.manifest_bytes();
    if m.len() % 2 == 1 {
        m.push(0);
    }
    raw.set_manifest_bytes(&m);
    let (b, e) = raw.offsets(MANIFEST_TENSOR);
    assert_eq!(b % 2, 0);
    raw.tensor(MANIFEST_TENSOR)["dtype"] = json!("F16");
    raw.tensor(MANIFEST_TENSOR)["shape"] = json!([(e - b) / 2]);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::DtypeMismatch { tensor, expected, .. }) if tensor == MANIFEST_TENSOR && expected == "U8"),
        "{r:?}"
    );
}

#[test]
fn manifest_rules_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());

    // A group size the format does not allow.
    let mut raw = Raw::parse(&bytes);
    let mut m = raw.manifest();
    m.layers
        .iter_mut()
        .find(|l| l.name == Q4_LAYER)
        .unwrap()
        .precision = Precision::Int4 { group: 48 };
    raw.set_manifest(&m);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::InvalidGroupSize { layer, group: 48, .. }) if layer == Q4_LAYER),
        "{r:?}"
    );

    // A kept block past the architecture's last block.
    let mut raw = Raw::parse(&bytes);
    let mut m = raw.manifest();
    m.kept_blocks.push(24);
    raw.set_manifest(&m);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::InvalidArgument { what, .. }) if what.contains("kept_blocks")),
        "{r:?}"
    );

    // A layer listed twice.
    let mut raw = Raw::parse(&bytes);
    let mut m = raw.manifest();
    m.layers.push(m.layers[0].clone());
    raw.set_manifest(&m);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(matches!(r, Err(Error::ManifestCorrupt { .. })), "{r:?}");

    // A tensor declared twice.
    let mut raw = Raw::parse(&bytes);
    let mut m = raw.manifest();
    m.tensors.push(m.tensors[0].clone());
    raw.set_manifest(&m);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(matches!(r, Err(Error::ManifestCorrupt { .. })), "{r:?}");
}

#[test]
fn non_package_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());

    let mut raw = Raw::parse(&bytes);
    raw.header["__metadata__"]["format"] = json!("pytorch");
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::NotAPackage { reason, .. }) if reason.contains("pytorch")),
        "{r:?}"
    );

    let mut raw = Raw::parse(&bytes);
    raw.header.remove("__metadata__");
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(matches!(r, Err(Error::NotAPackage { .. })), "{r:?}");

    let mut raw = Raw::parse(&bytes);
    raw.header["__metadata__"]
        .as_object_mut()
        .unwrap()
        .remove("manifest_crc32");
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(matches!(r, Err(Error::NotAPackage { .. })), "{r:?}");

    // A plain safetensors file, as any other tool writes it.
    let data: Vec<u8> = (0..16).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &data).unwrap();
    let plain = safetensors::serialize([("w", view)], None).unwrap();
    let r = open_bytes(dir.path(), &plain);
    assert!(matches!(r, Err(Error::NotAPackage { .. })), "{r:?}");
}

#[test]
fn corrupted_data_is_caught_by_verify_not_by_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = Raw::parse(&valid_package(dir.path()));
    let qweight = format!("{Q4_LAYER}.qweight");
    let (b, _) = raw.offsets(&qweight);
    raw.data[b + 3] ^= 0x10;
    let pkg = open_bytes(dir.path(), &raw.bytes()).unwrap();
    let r = pkg.verify();
    assert!(
        matches!(&r, Err(Error::ChecksumMismatch { tensor, expected, found }) if *tensor == qweight && expected != found),
        "{r:?}"
    );
    assert!(matches!(
        pkg.verify_tensor(&qweight),
        Err(Error::ChecksumMismatch { .. })
    ));
    pkg.verify_tensor("pos_embed.pos_embed").unwrap();
    pkg.verify_tensor(&format!("{Q4_LAYER}.scales")).unwrap();
}

#[test]
fn absurd_tensor_count_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut header = String::from(
        r#"{"__metadata__":{"format":"hiprune","format_version":"1","manifest_crc32":"00000000"}"#,
    );
    let count = MAX_TENSORS + 10;
    for i in 0..count {
        header.push_str(&format!(
            r#","t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#
        ));
    }
    header.push('}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let r = open_bytes(dir.path(), &bytes);
    assert!(
        matches!(r, Err(Error::TooManyTensors { count: c, max: MAX_TENSORS, .. }) if c == count),
        "{r:?}"
    );
}

/// Names of the entries in `dir`.
fn listing(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

#[test]
fn dropped_writer_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("never.hpk");
    let mut w = PackageWriter::create(&path).unwrap();
    w.add_f32("a", &[3], &[1.0, 2.0, 3.0]).unwrap();
    w.add_u8("b", &[1], &[9]).unwrap();
    assert!(!path.exists());
    assert_eq!(
        listing(dir.path()).len(),
        3,
        "one spool per alignment class while writing"
    );
    drop(w);
    assert!(!path.exists());
    assert!(
        listing(dir.path()).is_empty(),
        "left: {:?}",
        listing(dir.path())
    );
}

#[test]
fn unwritable_output_folder_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("no-such-folder");
    let r = PackageWriter::create(missing.join("out.hpk"));
    assert!(
        matches!(&r, Err(Error::Io { path, .. }) if *path == missing),
        "{r:?}"
    );

    // The "folder" is a regular file.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let r = PackageWriter::create(file.join("out.hpk"));
    assert!(
        matches!(&r, Err(Error::Io { path, .. }) if *path == file),
        "{r:?}"
    );

    assert_eq!(listing(dir.path()), vec![file]);
    assert!(matches!(
        Package::open(missing.join("out.hpk")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn output_path_that_is_a_folder_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("taken");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    let mut w = PackageWriter::create(&target).unwrap();
    w.add_f32("a", &[1], &[1.0]).unwrap();
    let r = w.finish(PackageInfo::default());
    assert!(
        matches!(&r, Err(Error::Io { path, .. }) if *path == target),
        "{r:?}"
    );
    assert_eq!(listing(dir.path()), vec![target.clone()]);
    assert!(target.join("keep").exists());
}

/// A symmetric INT4 layer stores `.qweight` and `.scales` only: a stray `.offsets` and a
/// missing `.scales` are both refused, by the reader and by the writer.
#[test]
fn symmetric_int4_layer_rules_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());

    // The INT4 layer relabelled symmetric: its `.offsets` is now stray.
    let mut raw = Raw::parse(&bytes);
    let mut m = raw.manifest();
    let layer = m.layers.iter_mut().find(|l| l.name == Q4_LAYER).unwrap();
    layer.precision = Precision::Int4Sym { group: 64 };
    raw.set_manifest(&m);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::UnexpectedTensor { tensor, .. }) if *tensor == format!("{Q4_LAYER}.offsets")),
        "{r:?}"
    );

    // The NF4 layer relabelled symmetric INT4: it has `.absmax`, not `.scales`.
    let mut raw = Raw::parse(&bytes);
    let mut m = raw.manifest();
    let layer = m.layers.iter_mut().find(|l| l.name == NF4_LAYER).unwrap();
    layer.precision = Precision::Int4Sym { group: 32 };
    raw.set_manifest(&m);
    let r = open_bytes(dir.path(), &raw.bytes());
    assert!(
        matches!(&r, Err(Error::MissingTensor { tensor }) if *tensor == format!("{NF4_LAYER}.scales")),
        "{r:?}"
    );

    // The writer applies the same rule at finish.
    let mut rng = StdRng::seed_from_u64(0xbad_0005);
    let mut w = PackageWriter::create(dir.path().join("sym.hpk")).unwrap();
    w.add_q4_layer("l", &random_q4(&mut rng, Q4Kind::Int4Sym, 3, 64, 32), None)
        .unwrap();
    w.add_f16("l.offsets", &[3, 2], &[f16::ZERO; 6]).unwrap();
    let r = w.finish(PackageInfo::default());
    assert!(
        matches!(&r, Err(Error::UnexpectedTensor { tensor, .. }) if tensor == "l.offsets"),
        "{r:?}"
    );
    assert!(!dir.path().join("sym.hpk").exists());
}

/// A computed sin-cos table: no stored tensor under its name, a square grid, a width
/// that is a multiple of 4, no bias, float dtypes.
#[test]
fn computed_table_rules_are_checked() {
    use hiprune::format::{Dtype, LayerEntry};
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());
    let table = |name: &str, grid: u32, n: u64, k: u64| LayerEntry {
        name: name.to_string(),
        precision: Precision::Sincos2d {
            grid,
            base_size: 2,
            source: Dtype::F32,
            dtype: Dtype::F16,
        },
        out_features: n,
        in_features: k,
        has_bias: false,
    };
    let with_layer = |entry: LayerEntry| {
        let mut raw = Raw::parse(&bytes);
        let mut m = raw.manifest();
        m.layers.push(entry);
        raw.set_manifest(&m);
        open_bytes(dir.path(), &raw.bytes())
    };

    // Valid: opens, and the entry stores nothing.
    let pkg = with_layer(table("computed.table", 3, 9, 8)).unwrap();
    assert!(
        pkg.layer("computed.table")
            .unwrap()
            .tensor_names()
            .is_empty()
    );
    drop(pkg);

    // The stored `pos_embed.pos_embed` cannot also be declared computed.
    let r = with_layer(table("pos_embed.pos_embed", 2, 4, 8));
    assert!(
        matches!(&r, Err(Error::UnexpectedTensor { tensor, .. }) if tensor == "pos_embed.pos_embed"),
        "{r:?}"
    );
    for bad in [
        table("t", 3, 8, 8), // not grid * grid
        table("t", 3, 9, 6), // width not a multiple of 4
        table("t", 0, 0, 8), // empty grid
        LayerEntry {
            has_bias: true,
            ..table("t", 3, 9, 8)
        },
        LayerEntry {
            precision: Precision::Sincos2d {
                grid: 3,
                base_size: 2,
                source: Dtype::U8,
                dtype: Dtype::F16,
            },
            ..table("t", 3, 9, 8)
        },
        LayerEntry {
            precision: Precision::Sincos2d {
                grid: 3,
                base_size: 0,
                source: Dtype::F32,
                dtype: Dtype::F16,
            },
            ..table("t", 3, 9, 8)
        },
    ] {
        let r = with_layer(bad.clone());
        assert!(
            matches!(&r, Err(Error::InvalidArgument { what, .. }) if what.contains("`t`")),
            "{bad:?}: {r:?}"
        );
    }
}

#[test]
fn version_1_packages_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());
    let raw = Raw::parse(&bytes);
    let v2 = raw.manifest();
    assert!(v2.removed_components.is_empty());
    // Version 1 is version 2 without the trailing `removed_components` (an empty list
    // is one zero byte in postcard).
    let mut m = raw.manifest_bytes();
    assert_eq!(m.pop(), Some(0));
    m[0] = 1;
    let mut v1 = Raw::parse(&bytes);
    v1.set_manifest_bytes(&m);
    v1.header["__metadata__"]["format_version"] = json!("1");
    let path = dir.path().join("v1.hpk");
    std::fs::write(&path, v1.bytes()).unwrap();
    let pkg = hiprune::Package::open(&path).unwrap();
    assert_eq!(pkg.manifest().format_version, 1);
    assert_eq!(pkg.manifest().layers, v2.layers);
    assert!(pkg.manifest().removed_components.is_empty());

    // The header and the manifest must agree on the version.
    let mut mixed = Raw::parse(&bytes);
    mixed.header["__metadata__"]["format_version"] = json!("1");
    let r = open_bytes(dir.path(), &mixed.bytes());
    assert!(matches!(r, Err(Error::ManifestCorrupt { .. })), "{r:?}");
}

#[test]
fn removed_components_are_checked() {
    use hiprune::format::ComponentCut;
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_package(dir.path());
    let cut = |block: u32, names: &[&str]| ComponentCut {
        block,
        components: names.iter().map(|n| n.to_string()).collect(),
    };
    for (cuts, needle) in [
        (vec![cut(0, &["telepathy"])], "is not one of"),
        (vec![cut(0, &["ff", "ff"])], "listed twice"),
        (vec![cut(0, &[])], "lists no component"),
        (vec![cut(0, &["ff"]), cut(0, &["attn"])], "listed twice"),
        (vec![cut(999, &["ff"])], "not a block the model runs"),
    ] {
        let mut raw = Raw::parse(&bytes);
        let mut m = raw.manifest();
        m.removed_components = cuts;
        raw.set_manifest(&m);
        let r = open_bytes(dir.path(), &raw.bytes());
        match r {
            Err(Error::InvalidArgument { what, reason }) => {
                assert!(what.contains("removed_components"), "{what}");
                assert!(reason.contains(needle), "{reason} lacks {needle}");
            }
            other => panic!("expected a removed_components error, got {other:?}"),
        }
    }
}
