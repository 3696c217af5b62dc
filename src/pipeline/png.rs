//! 8-bit RGB images and PNG output (through the `png` crate), with the generation
//! settings in the file's text chunks.

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::Tensor;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Pixels per row.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// `height * width * 3` bytes, R G B per pixel.
    pub data: Vec<u8>,
}

/// Text stored with an image (UTF-8 `iTXt` chunks), in order: say, `prompt`, `seed`,
/// `steps`, `guidance`, `model`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageMetadata {
    /// `(keyword, text)` pairs; keywords are 1 to 79 Latin-1 characters.
    pub entries: Vec<(String, String)>,
}

impl ImageMetadata {
    /// Appends one entry.
    pub fn with(mut self, keyword: impl Into<String>, text: impl ToString) -> Self {
        self.entries.push((keyword.into(), text.to_string()));
        self
    }
}

/// One decoded value in `[-1, 1]` as an 8-bit channel, as diffusers' image processor
/// does: `(x / 2 + 0.5)` clamped to `[0, 1]`, times 255, rounded half to even.
fn to_u8(x: f32) -> u8 {
    ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
}

impl RgbImage {
    /// The images of a decoded batch `[B, 3, H, W]` (values nominally in `[-1, 1]`,
    /// what [`VaeDecoder::decode`](super::VaeDecoder::decode) returns), one per item.
    pub fn from_decoded(images: &Tensor) -> Result<Vec<RgbImage>> {
        let [batch, 3, height, width] = images.shape[..] else {
            return Err(Error::invalid(
                "decoded images",
                format!("shape {:?} is not [B, 3, H, W]", images.shape),
            ));
        };
        let plane = height * width;
        Ok((0..batch)
            .map(|b| {
                let item = &images.data[b * 3 * plane..(b + 1) * 3 * plane];
                let mut data = Vec::with_capacity(plane * 3);
                for p in 0..plane {
                    for c in 0..3 {
                        data.push(to_u8(item[c * plane + p]));
                    }
                }
                RgbImage {
                    width,
                    height,
                    data,
                }
            })
            .collect())
    }

    /// Writes the image as a PNG file with `metadata` in text chunks. The file is
    /// written to a temporary file beside `path` and renamed over it when complete, so
    /// a failure leaves no partial PNG (and any earlier file untouched).
    pub fn write_png(&self, path: impl AsRef<Path>, metadata: &ImageMetadata) -> Result<()> {
        let path = path.as_ref();
        let (width, height) = (
            u32::try_from(self.width).ok().filter(|&w| w > 0),
            u32::try_from(self.height).ok().filter(|&h| h > 0),
        );
        let (Some(width), Some(height)) = (width, height) else {
            return Err(Error::invalid(
                "PNG image",
                format!("{} x {} is not a PNG size", self.width, self.height),
            ));
        };
        if self.data.len() != self.width * self.height * 3 {
            return Err(Error::length(
                "RGB image bytes",
                self.width * self.height * 3,
                self.data.len(),
            ));
        }
        for (keyword, _) in &metadata.entries {
            if keyword.is_empty() || keyword.len() > 79 || !keyword.is_ascii() {
                return Err(Error::invalid(
                    "PNG text keyword",
                    format!("`{keyword}` is not 1 to 79 ASCII characters"),
                ));
            }
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(Error::invalid(
                "output path",
                format!("folder {} does not exist", dir.display()),
            ));
        }
        let encoding = |e: ::png::EncodingError| Error::invalid("PNG encoding", e.to_string());
        let temp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
        {
            let mut out = BufWriter::new(temp.as_file());
            let mut encoder = ::png::Encoder::new(&mut out, width, height);
            encoder.set_color(::png::ColorType::Rgb);
            encoder.set_depth(::png::BitDepth::Eight);
            for (keyword, text) in &metadata.entries {
                encoder
                    .add_itxt_chunk(keyword.clone(), text.clone())
                    .map_err(encoding)?;
            }
            let mut writer = encoder.write_header().map_err(encoding)?;
            writer.write_image_data(&self.data).map_err(encoding)?;
            writer.finish().map_err(encoding)?;
            out.flush().map_err(|e| Error::io(path, e))?;
        }
        temp.as_file()
            .sync_all()
            .map_err(|e| Error::io(temp.path(), e))?;
        temp.persist(path).map_err(|e| Error::io(path, e.error))?;
        Ok(())
    }
}
