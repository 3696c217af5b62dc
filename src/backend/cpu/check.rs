//! The argument checks every CPU linear kernel runs before touching memory.

use crate::error::{Error, Result};

/// Checks the lengths of `x [M, K]`, `bias [N]` and `y [M, N]` against the weights.
pub(crate) fn check_linear_args(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    y: &[f32],
) -> Result<()> {
    let mk = m
        .checked_mul(k)
        .ok_or_else(|| Error::invalid("M", "M * K overflows"))?;
    let mn = m
        .checked_mul(n)
        .ok_or_else(|| Error::invalid("M", "M * N overflows"))?;
    if x.len() != mk {
        return Err(Error::length("activations x [M, K]", mk, x.len()));
    }
    if y.len() != mn {
        return Err(Error::length("output y [M, N]", mn, y.len()));
    }
    if let Some(b) = bias
        && b.len() != n
    {
        return Err(Error::length("bias [N]", n, b.len()));
    }
    Ok(())
}
