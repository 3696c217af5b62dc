//! Validation of [`MmditInputs`] against the model: shapes, batch agreement, latent
//! size (patch divisibility, positional-table coverage) and finiteness, each error
//! naming the tensor.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::mmdit::{Dims, Mmdit, MmditInputs};
use crate::model::tensor::Tensor;

fn shape_error(tensor: &str, expected: Vec<usize>, found: &[usize]) -> Error {
    Error::ShapeMismatch {
        tensor: tensor.to_string(),
        expected,
        found: found.to_vec(),
    }
}

/// Fails on the first NaN or infinity of `t`.
pub(crate) fn check_finite(tensor: &str, t: &Tensor) -> Result<()> {
    if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            format!("tensor `{tensor}`"),
            format!("element {i} is {} (inputs must be finite)", t.data[i]),
        ));
    }
    Ok(())
}

impl<B: Backend> Mmdit<B> {
    /// Checks `inputs` and derives the sizes of the pass.
    pub(crate) fn check_inputs(&self, inputs: &MmditInputs<'_>) -> Result<Dims> {
        let cfg = &self.config;
        let hs = inputs.hidden_states;
        if hs.shape.len() != 4 || hs.shape[1] != cfg.in_channels || hs.shape[0] == 0 {
            let mut e = vec![
                hs.shape.first().copied().unwrap_or(1).max(1),
                cfg.in_channels,
            ];
            e.extend(
                hs.shape
                    .get(2..4)
                    .unwrap_or(&[cfg.sample_size, cfg.sample_size]),
            );
            return Err(shape_error("hidden_states", e, &hs.shape));
        }
        let (batch, h, w) = (hs.shape[0], hs.shape[2], hs.shape[3]);
        let p = cfg.patch_size;
        if h == 0 || w == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return Err(Error::invalid(
                "tensor `hidden_states`",
                format!("latent size {h} x {w} is not a positive multiple of the patch size {p}"),
            ));
        }
        let m = cfg.pos_embed_max_size;
        if h / p > m || w / p > m {
            return Err(Error::invalid(
                "tensor `hidden_states`",
                format!(
                    "latent size {h} x {w} gives a {} x {} patch grid, larger than the {m} x {m} positional table",
                    h / p,
                    w / p
                ),
            ));
        }
        let ehs = inputs.encoder_hidden_states;
        if ehs.shape.len() != 3
            || ehs.shape[0] != batch
            || ehs.shape[2] != cfg.joint_attention_dim
            || ehs.shape[1] == 0
        {
            let t = ehs.shape.get(1).copied().unwrap_or(1).max(1);
            return Err(shape_error(
                "encoder_hidden_states",
                vec![batch, t, cfg.joint_attention_dim],
                &ehs.shape,
            ));
        }
        let pooled = inputs.pooled_projections;
        if pooled.shape != [batch, cfg.pooled_projection_dim] {
            return Err(shape_error(
                "pooled_projections",
                vec![batch, cfg.pooled_projection_dim],
                &pooled.shape,
            ));
        }
        if inputs.timestep.shape != [batch] {
            return Err(shape_error("timestep", vec![batch], &inputs.timestep.shape));
        }
        check_finite("hidden_states", hs)?;
        check_finite("encoder_hidden_states", ehs)?;
        check_finite("pooled_projections", pooled)?;
        check_finite("timestep", inputs.timestep)?;
        Ok(Dims {
            batch,
            h,
            w,
            n_img: (h / p) * (w / p),
            n_ctx: ehs.shape[1],
        })
    }
}
