//! Scaled dot-product attention on the CPU (no mask, no dropout), threaded over
//! batch items x heads.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Queries handed to one rayon task.
const QUERIES_PER_TASK: usize = 64;

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
    // Keys and values per (item, head), gathered once; tasks are (item, head, block of
    // queries), so one long sequence (the VAE's single-head attention) still spreads
    // over every thread.
    let keys_values: Vec<(Vec<f32>, Vec<f32>)> = (0..batch * heads)
        .into_par_iter()
        .map(|bh| {
            (
                gather(k, bh / heads, bh % heads),
                gather(v, bh / heads, bh % heads),
            )
        })
        .collect();
    let blocks = seq.div_ceil(QUERIES_PER_TASK);
    let results: Vec<Vec<f32>> = (0..batch * heads * blocks)
        .into_par_iter()
        .map(|task| {
            let (bh, block) = (task / blocks, task % blocks);
            let (b, h) = (bh / heads, bh % heads);
            let (kh, vh) = &keys_values[bh];
            let queries = block * QUERIES_PER_TASK..((block + 1) * QUERIES_PER_TASK).min(seq);
            let mut res = vec![0.0f32; queries.len() * head_dim];
            let mut p = vec![0.0f32; seq];
            for (qi_index, i) in queries.enumerate() {
                let o = (b * seq + i) * d + h * head_dim;
                let qi = &q[o..o + head_dim];
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
                let ri = &mut res[qi_index * head_dim..(qi_index + 1) * head_dim];
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
    for (task, res) in results.iter().enumerate() {
        let (bh, block) = (task / blocks, task % blocks);
        let (b, h) = (bh / heads, bh % heads);
        for (r, i) in (block * QUERIES_PER_TASK..seq)
            .take(QUERIES_PER_TASK)
            .enumerate()
        {
            let o = (b * seq + i) * d + h * head_dim;
            out[o..o + head_dim].copy_from_slice(&res[r * head_dim..(r + 1) * head_dim]);
        }
    }
    Ok(())
}
