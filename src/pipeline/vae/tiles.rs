//! Tiled decoding, as diffusers' `AutoencoderKL.tiled_decode`: the latent is cut into
//! overlapping square tiles, each decoded on its own (so memory is bounded by one
//! tile), and neighbouring tiles are blended linearly across the overlap.

use crate::error::{Error, Result};

/// How a large latent is decoded in tiles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiling {
    /// Side of a latent tile in latent pixels (diffusers' `tile_latent_min_size`); a
    /// latent no larger than this on both sides is decoded whole.
    pub latent_tile: usize,
    /// Fraction of a tile that overlaps its neighbour (diffusers' 0.25).
    pub overlap: f64,
}

impl Default for Tiling {
    /// 64-pixel latent tiles (512 x 512 image pixels with SD3's VAE), overlap 0.25.
    fn default() -> Self {
        Tiling {
            latent_tile: 64,
            overlap: 0.25,
        }
    }
}

/// A host image (or latent), channels-last: `[batch, height, width, channels]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct HostImage {
    pub data: Vec<f32>,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

impl HostImage {
    fn at(&self, b: usize, y: usize, x: usize) -> usize {
        ((b * self.height + y) * self.width + x) * self.channels
    }

    /// Rows `rows` and columns `cols` of every batch item.
    fn crop(&self, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) -> HostImage {
        let (h, w) = (rows.len(), cols.len());
        let mut data = Vec::with_capacity(self.batch * h * w * self.channels);
        for b in 0..self.batch {
            for y in rows.clone() {
                let start = self.at(b, y, cols.start);
                data.extend_from_slice(&self.data[start..start + w * self.channels]);
            }
        }
        HostImage {
            data,
            batch: self.batch,
            height: h,
            width: w,
            channels: self.channels,
        }
    }
}

/// The blend weights of row/column `i` of an overlap of `extent`: (previous tile, this
/// tile), as diffusers' `blend_v` / `blend_h` compute them.
fn weights(i: usize, extent: usize) -> (f32, f32) {
    let t = i as f64 / extent as f64;
    ((1.0 - t) as f32, t as f32)
}

/// diffusers' `blend_v`: the first rows of `below` fade in from the last rows of
/// `above` (same width).
fn blend_vertical(above: &HostImage, below: &mut HostImage, extent: usize) {
    let extent = extent.min(above.height).min(below.height);
    let row = below.width * below.channels;
    for b in 0..below.batch {
        for y in 0..extent {
            let (wa, wb) = weights(y, extent);
            let src = above.at(b, above.height - extent + y, 0);
            let dst = below.at(b, y, 0);
            for (d, &s) in below.data[dst..dst + row]
                .iter_mut()
                .zip(&above.data[src..src + row])
            {
                *d = s * wa + *d * wb;
            }
        }
    }
}

/// diffusers' `blend_h`: the first columns of `right` fade in from the last columns
/// of `left` (same height).
fn blend_horizontal(left: &HostImage, right: &mut HostImage, extent: usize) {
    let extent = extent.min(left.width).min(right.width);
    let c = right.channels;
    for b in 0..right.batch {
        for y in 0..right.height {
            for x in 0..extent {
                let (wl, wr) = weights(x, extent);
                let src = left.at(b, y, left.width - extent + x);
                let dst = right.at(b, y, x);
                for (d, &s) in right.data[dst..dst + c]
                    .iter_mut()
                    .zip(&left.data[src..src + c])
                {
                    *d = s * wl + *d * wr;
                }
            }
        }
    }
}

/// The tile geometry of `tiling` for a decoder that scales by `scale`: (latent
/// stride between tiles, blend extent and kept side in image pixels).
fn geometry(tiling: Tiling, scale: usize) -> Result<(usize, usize, usize)> {
    if !(0.0..1.0).contains(&tiling.overlap) {
        return Err(Error::invalid(
            "tile overlap",
            format!("{} is not in [0, 1)", tiling.overlap),
        ));
    }
    let sample_tile = tiling.latent_tile.saturating_mul(scale);
    // int() of the products, as diffusers computes them.
    let stride = (tiling.latent_tile as f64 * (1.0 - tiling.overlap)) as usize;
    let extent = (sample_tile as f64 * tiling.overlap) as usize;
    if stride == 0 {
        return Err(Error::invalid(
            "latent tile",
            format!(
                "a {}-pixel tile with overlap {} does not advance",
                tiling.latent_tile, tiling.overlap
            ),
        ));
    }
    Ok((stride, extent, sample_tile - extent))
}

/// Decodes `latent` tile by tile with `decode` (one latent tile in, its image out,
/// `scale` times larger) and blends the tiles into one image.
pub(super) fn decode_tiled(
    latent: &HostImage,
    tiling: Tiling,
    scale: usize,
    mut decode: impl FnMut(&HostImage) -> Result<HostImage>,
) -> Result<HostImage> {
    let (stride, extent, keep) = geometry(tiling, scale)?;
    let tile = tiling.latent_tile;
    let mut rows: Vec<Vec<HostImage>> = Vec::new();
    for i in (0..latent.height).step_by(stride) {
        let mut row = Vec::new();
        for j in (0..latent.width).step_by(stride) {
            let part = latent.crop(
                i..(i + tile).min(latent.height),
                j..(j + tile).min(latent.width),
            );
            row.push(decode(&part)?);
        }
        rows.push(row);
    }
    // Blend in place in diffusers' order: a tile is blended with its upper and left
    // neighbours after they have been blended themselves.
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            let mut current = std::mem::take(&mut rows[i][j]);
            if i > 0 {
                blend_vertical(&rows[i - 1][j], &mut current, extent);
            }
            if j > 0 {
                blend_horizontal(&rows[i][j - 1], &mut current, extent);
            }
            rows[i][j] = current;
        }
    }
    let first = &rows[0][0];
    let (batch, channels) = (first.batch, first.channels);
    let height: usize = rows.iter().map(|r| r[0].height.min(keep)).sum();
    let width: usize = rows[0].iter().map(|t| t.width.min(keep)).sum();
    let mut out = HostImage {
        data: vec![0.0; batch * height * width * channels],
        batch,
        height,
        width,
        channels,
    };
    let mut top = 0;
    for row in &rows {
        let mut left = 0;
        for t in row {
            let (h, w) = (t.height.min(keep), t.width.min(keep));
            for b in 0..batch {
                for y in 0..h {
                    let src = t.at(b, y, 0);
                    let dst = out.at(b, top + y, left);
                    out.data[dst..dst + w * channels]
                        .copy_from_slice(&t.data[src..src + w * channels]);
                }
            }
            left += w;
        }
        top += row[0].height.min(keep);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(batch: usize, height: usize, width: usize, channels: usize) -> HostImage {
        let n = batch * height * width * channels;
        HostImage {
            data: (0..n).map(|i| i as f32).collect(),
            batch,
            height,
            width,
            channels,
        }
    }

    #[test]
    fn identity_decoder_with_no_overlap_reassembles_the_input() {
        let latent = ramp(2, 11, 7, 3);
        let tiling = Tiling {
            latent_tile: 4,
            overlap: 0.0,
        };
        let out = decode_tiled(&latent, tiling, 1, |t| Ok(t.clone())).unwrap();
        assert_eq!(out, latent);
    }

    #[test]
    fn identity_decoder_with_overlap_keeps_a_linear_ramp() {
        // Blending two overlapping crops of a ramp along x gives back the ramp's values
        // only where the crops agree: an identity decoder makes them agree everywhere.
        let latent = ramp(1, 9, 10, 1);
        let tiling = Tiling {
            latent_tile: 4,
            overlap: 0.25,
        };
        let out = decode_tiled(&latent, tiling, 1, |t| Ok(t.clone())).unwrap();
        assert_eq!((out.height, out.width), (9, 10));
        for (a, b) in out.data.iter().zip(&latent.data) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn a_tile_that_does_not_advance_is_an_error() {
        let tiling = Tiling {
            latent_tile: 1,
            overlap: 0.5,
        };
        let err = decode_tiled(&ramp(1, 3, 3, 1), tiling, 8, |t| Ok(t.clone())).unwrap_err();
        assert!(err.to_string().contains("does not advance"), "{err}");
        let bad = Tiling {
            latent_tile: 8,
            overlap: 1.0,
        };
        assert!(decode_tiled(&ramp(1, 3, 3, 1), bad, 8, |t| Ok(t.clone())).is_err());
    }
}
