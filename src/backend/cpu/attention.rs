//! Scaled dot-product attention on the CPU (no mask, no dropout), threaded over
//! batch items x heads.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Shape of one attention call: `batch` items of `seq` tokens, `heads` heads of
/// `head_dim` channels; q, k, v and the output are `[batch, seq, heads * head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch items.
    pub batch: usize,
    /// Tokens per item (queries = keys).
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
}

/// `out = softmax(q k^T * scale) v` per batch item and head, with `scale =
/// 1/sqrt(head_dim)`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
    out: &mut [f32],
) -> Result<()> {
    let AttentionShape {
        batch,
        seq,
        heads,
        head_dim,
    } = s;
    let d = heads * head_dim;
    let len = batch * seq * d;
    for (name, buf) in [("q", q), ("k", k), ("v", v)] {
        if buf.len() != len {
            return Err(Error::length(format!("attention {name}"), len, buf.len()));
        }
    }
    if out.len() != len {
        return Err(Error::length("attention output", len, out.len()));
    }
    if len == 0 {
        return Ok(());
    }
    let scale = 1.0 / (head_dim as f32).sqrt();
    let gather = |src: &[f32], b: usize, h: usize| -> Vec<f32> {
        let mut t = Vec::with_capacity(seq * head_dim);
        for i in 0..seq {
            let o = (b * seq + i) * d + h * head_dim;
            t.extend_from_slice(&src[o..o + head_dim]);
        }
        t
    };
    let results: Vec<Vec<f32>> = (0..batch * heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            let (qh, kh, vh) = (gather(q, b, h), gather(k, b, h), gather(v, b, h));
            let mut res = vec![0.0f32; seq * head_dim];
            let mut p = vec![0.0f32; seq];
            for i in 0..seq {
                let qi = &qh[i * head_dim..(i + 1) * head_dim];
                let mut max = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate() {
                    let kj = &kh[j * head_dim..(j + 1) * head_dim];
                    let dot: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
                    *pj = dot * scale;
                    max = max.max(*pj);
                }
                let mut sum = 0.0f32;
                for pj in p.iter_mut() {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let inv = 1.0 / sum;
                let ri = &mut res[i * head_dim..(i + 1) * head_dim];
                for (j, &pj) in p.iter().enumerate() {
                    let w = pj * inv;
                    let vj = &vh[j * head_dim..(j + 1) * head_dim];
                    for (r, &vv) in ri.iter_mut().zip(vj) {
                        *r += w * vv;
                    }
                }
            }
            res
        })
        .collect();
    for (bh, res) in results.iter().enumerate() {
        let (b, h) = (bh / heads, bh % heads);
        for i in 0..seq {
            let o = (b * seq + i) * d + h * head_dim;
            out[o..o + head_dim].copy_from_slice(&res[i * head_dim..(i + 1) * head_dim]);
        }
    }
    Ok(())
}
