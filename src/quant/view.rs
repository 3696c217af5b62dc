//! Device-neutral views of a linear layer's weights, borrowed from wherever the model
//! keeps them (a package's memory map, a checkpoint's, or memory): dense f32/f16/bf16
//! data or a 4-bit [`Q4Weights`] matrix. Every backend uploads from these; none of
//! them owns the types.

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::quant::Q4Weights;

/// Dense weight data of a matrix `[N, K]`, row-major.
#[derive(Debug, Clone, Copy)]
pub enum DenseData<'a> {
    /// f32 weights.
    F32(&'a [f32]),
    /// f16 weights.
    F16(&'a [f16]),
    /// bf16 weights.
    Bf16(&'a [bf16]),
}

impl DenseData<'_> {
    /// Whether the view holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            DenseData::F32(d) => d.len(),
            DenseData::F16(d) => d.len(),
            DenseData::Bf16(d) => d.len(),
        }
    }
}

/// A linear layer's weight matrix `W [N, K]`, dense or 4-bit, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum LinearWeights<'a> {
    /// Dense weights.
    Dense {
        /// The data, `N * K` elements.
        data: DenseData<'a>,
        /// Output features.
        n: usize,
        /// Input features.
        k: usize,
    },
    /// INT4 or NF4 weights.
    Q4(Q4Weights<'a>),
}

impl<'a> LinearWeights<'a> {
    /// Wraps dense weights after checking `data` holds `n * k` elements.
    pub fn dense(data: DenseData<'a>, n: usize, k: usize) -> Result<Self> {
        let expected = n
            .checked_mul(k)
            .ok_or_else(|| Error::invalid("dense weight shape", format!("{n} x {k} overflows")))?;
        if n == 0 || k == 0 {
            return Err(Error::invalid(
                "dense weight shape",
                format!("{n} x {k} is empty"),
            ));
        }
        if data.len() != expected {
            return Err(Error::length("dense weights", expected, data.len()));
        }
        Ok(LinearWeights::Dense { data, n, k })
    }

    /// Output features N.
    pub fn n(&self) -> usize {
        match self {
            LinearWeights::Dense { n, .. } => *n,
            LinearWeights::Q4(w) => w.n(),
        }
    }

    /// Input features K.
    pub fn k(&self) -> usize {
        match self {
            LinearWeights::Dense { k, .. } => *k,
            LinearWeights::Q4(w) => w.k(),
        }
    }
}
