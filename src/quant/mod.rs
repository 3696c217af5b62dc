//! 4-bit weight formats.
//!
//! A linear weight `W` is `[N, K]` (out features, in features; PyTorch layout). Both
//! 4-bit kinds share one storage layout, so one kernel family serves both:
//!
//! - `packed`: `u8 [N, K/2]`; byte `j` of row `n` holds `k = 2j` in the low nibble and
//!   `k = 2j + 1` in the high nibble; codes `q` in `0..=15`.
//! - `scales`: `f16 [N, K/G]`, one per group of `G` consecutive weights along `K`.
//! - INT4 ([`Q4Kind::Int4`]): `offsets` `f16 [N, K/G]`, `w = scale * q + offset`
//!   (asymmetric; an explicit zero point per group).
//! - Symmetric INT4 ([`Q4Kind::Int4Sym`]): no offsets; `w = scale * (q - 8)`, i.e. the
//!   codebook [`INT4_SYM_CODEBOOK`] `[-8, -7, ..., 7]` times the group's scale.
//! - NF4 ([`Q4Kind::Nf4`]): no offsets; `w = absmax * NF4[q]` with the 16-level
//!   normal-float codebook of bitsandbytes ([`NF4_CODEBOOK`]); the scale is the block's
//!   absmax.
//!
//! Bytes per weight: `0.5 + 2/G` (NF4, symmetric INT4) or `0.5 + 4/G` (asymmetric
//! INT4); for `G = 64` symmetric INT4 is 0.53125 bytes (4.25 bits, 3.76x smaller than
//! f16) and asymmetric INT4 0.5625 bytes (4.5 bits, 3.56x smaller).

pub mod bnb;
pub mod nf4;
pub mod reference;
pub mod rtn;
pub mod view;

pub use bnb::import_bnb_nf4;
pub use nf4::{NF4_DEFAULT_BLOCK, quantize_nf4, quantize_nf4_row};
pub use rtn::{Int4Options, quantize_int4, quantize_int4_row};
pub use view::{DenseData, LinearWeights};

use half::f16;

use crate::error::{Error, Result};

/// Group sizes along K allowed for INT4.
pub const INT4_GROUP_SIZES: &[usize] = &[32, 64, 128];
/// Block sizes along K allowed for NF4 (bitsandbytes' default is 64).
pub const NF4_BLOCK_SIZES: &[usize] = &[32, 64, 128];

/// The 16 NF4 levels of bitsandbytes (normal-float quantiles scaled to [-1, 1]), indexed
/// by the 4-bit code.
pub const NF4_CODEBOOK: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The INT4 "codebook": code `q` decodes to `q` before scale and offset.
pub const INT4_CODEBOOK: [f32; 16] = [
    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
];

/// The symmetric INT4 codebook: code `q` decodes to `q - 8` before the scale.
pub const INT4_SYM_CODEBOOK: [f32; 16] = [
    -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
];

/// Which 4-bit weight kind a matrix holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Q4Kind {
    /// Uniform 4-bit codes with per-group scale and offset: `w = scale * q + offset`.
    Int4,
    /// NF4 codes with per-block absmax: `w = absmax * NF4[q]`.
    Nf4,
    /// Symmetric uniform 4-bit codes with a per-group scale and no offset:
    /// `w = scale * (q - 8)`.
    Int4Sym,
}

impl Q4Kind {
    /// The value each 4-bit code decodes to before scaling.
    pub fn codebook(self) -> &'static [f32; 16] {
        match self {
            Q4Kind::Int4 => &INT4_CODEBOOK,
            Q4Kind::Nf4 => &NF4_CODEBOOK,
            Q4Kind::Int4Sym => &INT4_SYM_CODEBOOK,
        }
    }

    /// The group (block) sizes this kind allows.
    pub fn allowed_groups(self) -> &'static [usize] {
        match self {
            Q4Kind::Int4 | Q4Kind::Int4Sym => INT4_GROUP_SIZES,
            Q4Kind::Nf4 => NF4_BLOCK_SIZES,
        }
    }

    /// Whether the kind stores an offset per group.
    pub fn has_offsets(self) -> bool {
        matches!(self, Q4Kind::Int4)
    }

    /// Short lowercase name (`int4`, `nf4`, `int4sym`).
    pub fn name(self) -> &'static str {
        match self {
            Q4Kind::Int4 => "int4",
            Q4Kind::Nf4 => "nf4",
            Q4Kind::Int4Sym => "int4sym",
        }
    }
}

impl std::fmt::Display for Q4Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks `n`, `k` and `group` of a 4-bit matrix named `layer`.
pub fn check_q4_dims(kind: Q4Kind, layer: &str, k: usize, group: usize) -> Result<()> {
    if !kind.allowed_groups().contains(&group) {
        return Err(Error::InvalidGroupSize {
            layer: layer.to_string(),
            group,
            allowed: kind.allowed_groups(),
        });
    }
    if k == 0 || !k.is_multiple_of(group) {
        return Err(Error::GroupDoesNotDivide {
            layer: layer.to_string(),
            k,
            group,
        });
    }
    Ok(())
}

/// Checks that a dense weight buffer `w` holds `n * k` values with `n >= 1`.
pub(crate) fn check_weight_len(w: &[f32], n: usize, k: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("weights", "N (rows) must be at least 1"));
    }
    let total = n
        .checked_mul(k)
        .ok_or_else(|| Error::invalid("weights", "N * K overflows"))?;
    if w.len() != total {
        return Err(Error::length("weights", total, w.len()));
    }
    Ok(())
}

/// A borrowed 4-bit weight matrix `W [N, K]`, for example a zero-copy view into a
/// package's memory map. Constructed only through [`Q4Weights::new`], which checks every
/// length, so kernels can index without further checks.
#[derive(Debug, Clone, Copy)]
pub struct Q4Weights<'a> {
    kind: Q4Kind,
    n: usize,
    k: usize,
    group: usize,
    packed: &'a [u8],
    scales: &'a [f16],
    offsets: &'a [f16],
}

impl<'a> Q4Weights<'a> {
    /// Wraps the three buffers of a 4-bit matrix after checking their lengths against
    /// `n`, `k` and `group`. `offsets` must be empty for NF4 and symmetric INT4.
    pub fn new(
        kind: Q4Kind,
        n: usize,
        k: usize,
        group: usize,
        packed: &'a [u8],
        scales: &'a [f16],
        offsets: &'a [f16],
    ) -> Result<Self> {
        check_q4_dims(kind, "4-bit matrix", k, group)?;
        if n == 0 {
            return Err(Error::invalid(
                "4-bit matrix",
                "N (rows) must be at least 1",
            ));
        }
        let packed_len = n
            .checked_mul(k / 2)
            .ok_or_else(|| Error::invalid("4-bit matrix", "N * K overflows"))?;
        let groups = n * (k / group);
        if packed.len() != packed_len {
            return Err(Error::length(
                "packed 4-bit codes",
                packed_len,
                packed.len(),
            ));
        }
        if scales.len() != groups {
            return Err(Error::length("scales", groups, scales.len()));
        }
        let expected_offsets = if kind.has_offsets() { groups } else { 0 };
        if offsets.len() != expected_offsets {
            return Err(Error::length("offsets", expected_offsets, offsets.len()));
        }
        Ok(Q4Weights {
            kind,
            n,
            k,
            group,
            packed,
            scales,
            offsets,
        })
    }

    /// The weight kind.
    pub fn kind(&self) -> Q4Kind {
        self.kind
    }
    /// Output features (rows).
    pub fn n(&self) -> usize {
        self.n
    }
    /// Input features (columns).
    pub fn k(&self) -> usize {
        self.k
    }
    /// Group (block) size along K.
    pub fn group(&self) -> usize {
        self.group
    }
    /// Groups per row, `K / G`.
    pub fn groups_per_row(&self) -> usize {
        self.k / self.group
    }
    /// Packed codes, `[N, K/2]`.
    pub fn packed(&self) -> &'a [u8] {
        self.packed
    }
    /// Scales (INT4, symmetric INT4) or absmax (NF4), `[N, K/G]`.
    pub fn scales(&self) -> &'a [f16] {
        self.scales
    }
    /// Offsets `[N, K/G]` for INT4, empty for NF4 and symmetric INT4.
    pub fn offsets(&self) -> &'a [f16] {
        self.offsets
    }
    /// Packed codes of row `n`.
    pub fn packed_row(&self, n: usize) -> &'a [u8] {
        &self.packed[n * self.k / 2..(n + 1) * self.k / 2]
    }
    /// Scales of row `n`.
    pub fn scales_row(&self, n: usize) -> &'a [f16] {
        let g = self.groups_per_row();
        &self.scales[n * g..(n + 1) * g]
    }
    /// Offsets of row `n` (empty for NF4 and symmetric INT4).
    pub fn offsets_row(&self, n: usize) -> &'a [f16] {
        if self.kind.has_offsets() {
            let g = self.groups_per_row();
            &self.offsets[n * g..(n + 1) * g]
        } else {
            &[]
        }
    }
    /// Bytes the matrix occupies (codes, scales and offsets).
    pub fn nbytes(&self) -> usize {
        self.packed.len() + 2 * (self.scales.len() + self.offsets.len())
    }

    /// Dequantises row `n` into `out` (length K), in f32.
    pub fn dequantize_row(&self, n: usize, out: &mut [f32]) {
        let book = self.kind.codebook();
        let scales = self.scales_row(n);
        let offsets = self.offsets_row(n);
        for (j, &byte) in self.packed_row(n).iter().enumerate() {
            let k = 2 * j;
            let g = k / self.group;
            let s = scales[g].to_f32();
            let o = offsets.get(g).map_or(0.0, |o| o.to_f32());
            out[k] = s * book[(byte & 0x0f) as usize] + o;
            out[k + 1] = s * book[(byte >> 4) as usize] + o;
        }
    }
}

/// An owned 4-bit weight matrix (the output of a quantiser); [`Q4Matrix::view`] gives the
/// borrowed form that kernels take.
#[derive(Debug, Clone, PartialEq)]
pub struct Q4Matrix {
    /// The weight kind.
    pub kind: Q4Kind,
    /// Output features (rows).
    pub n: usize,
    /// Input features (columns).
    pub k: usize,
    /// Group (block) size along K.
    pub group: usize,
    /// Packed codes, `[N, K/2]`.
    pub packed: Vec<u8>,
    /// Scales (INT4, symmetric INT4) or absmax (NF4), `[N, K/G]`.
    pub scales: Vec<f16>,
    /// Offsets `[N, K/G]` for INT4, empty for NF4 and symmetric INT4.
    pub offsets: Vec<f16>,
}

impl Q4Matrix {
    /// Borrows the matrix, checking its buffers' lengths.
    pub fn view(&self) -> Result<Q4Weights<'_>> {
        Q4Weights::new(
            self.kind,
            self.n,
            self.k,
            self.group,
            &self.packed,
            &self.scales,
            &self.offsets,
        )
    }
}
