//! [`SensitivityReport`]: what `analyze` measured, as JSON, plus an SVG plot of the
//! scores against block position.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::COMPONENT_NAMES;

/// Removal impact of one sub-component of a block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentScore {
    /// `norm1`, `norm1_context`, `attn`, `attn2`, `ff` or `ff_context`.
    pub component: String,
    /// Mean relative L2 error of the output with the component removed.
    pub rel_l2: f32,
    /// Mean cosine distance (1 - cos) of the output with the component removed.
    pub cos_dist: f32,
}

/// The scores of one block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockScores {
    /// Original block index.
    pub block: usize,
    /// Mean relative L2 error of the predicted velocity with the block removed
    /// (`None` when only data-free scores were computed).
    pub rel_l2: Option<f32>,
    /// Mean cosine distance of the velocity with the block removed.
    pub cos_dist: Option<f32>,
    /// Block influence: 1 - cos(block input, block output) of the image stream,
    /// averaged over tokens and inputs.
    pub influence: Option<f32>,
    /// Data-free weight score (DIMAP-style energy, see [`crate::compress::analyze`]).
    pub weight_score: f32,
    /// Removal impact per sub-component.
    pub components: Vec<ComponentScore>,
}

/// A sensitivity analysis of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensitivityReport {
    /// The analysed model (folder or package name).
    pub model: String,
    /// Blocks of the model.
    pub num_layers: usize,
    /// Where the inputs came from (a calibration file, or seeded synthetic inputs).
    pub inputs: String,
    /// Whether the inputs were synthetic.
    pub synthetic_inputs: bool,
    /// Number of inputs the removal scores are averaged over.
    pub num_inputs: usize,
    /// One entry per analysed block (blocks a package removed are absent).
    pub blocks: Vec<BlockScores>,
}

impl SensitivityReport {
    /// The per-block sensitivity used for planning, indexed by original block (0 for
    /// blocks not analysed): the removal error when measured, else the block influence,
    /// else the weight score.
    pub fn sensitivity(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.num_layers];
        for b in &self.blocks {
            if b.block < out.len() {
                out[b.block] = b.rel_l2.or(b.influence).unwrap_or(b.weight_score);
            }
        }
        out
    }

    /// Reads a report written by [`write`](Self::write).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::invalid(
                format!("sensitivity report {}", path.display()),
                e.to_string(),
            )
        })
    }

    /// Writes the report as pretty JSON.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid("sensitivity report", e.to_string()))?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }

    /// An SVG line plot: score against block position, one line for the block removal
    /// error, one per sub-component, one for the block influence and one for the weight
    /// score, each scaled to its own maximum so their shapes can be compared.
    pub fn svg(&self) -> String {
        let mut series: Vec<(String, Vec<(usize, f32)>)> = Vec::new();
        let mut push = |name: &str, pts: Vec<(usize, f32)>| {
            if !pts.is_empty() {
                series.push((name.to_string(), pts));
            }
        };
        push(
            "block (rel. L2)",
            self.blocks
                .iter()
                .filter_map(|b| b.rel_l2.map(|v| (b.block, v)))
                .collect(),
        );
        for comp in COMPONENT_NAMES {
            push(
                comp,
                self.blocks
                    .iter()
                    .filter_map(|b| {
                        b.components
                            .iter()
                            .find(|c| c.component == comp)
                            .map(|c| (b.block, c.rel_l2))
                    })
                    .collect(),
            );
        }
        push(
            "influence 1-cos",
            self.blocks
                .iter()
                .filter_map(|b| b.influence.map(|v| (b.block, v)))
                .collect(),
        );
        push(
            "weight score",
            self.blocks
                .iter()
                .map(|b| (b.block, b.weight_score))
                .collect(),
        );
        let colors = [
            "#000000", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
            "#7f7f7f",
        ];
        let (w, h, left, right, top, bottom) = (760.0, 420.0, 60.0, 170.0, 30.0, 50.0);
        let pw = w - left - right;
        let ph = h - top - bottom;
        let last = self.num_layers.saturating_sub(1).max(1) as f64;
        let x_of = |i: usize| left + pw * i as f64 / last;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="18">Sensitivity by block position: {} (each line scaled to its maximum)</text>"#,
            xml_escape(&self.model)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
        );
        for i in 0..self.num_layers {
            let x = x_of(i);
            let _ = writeln!(
                s,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{i}</text>"#,
                top + ph + 16.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">block</text>"#,
            left + pw / 2.0,
            h - 8.0
        );
        for (si, (name, pts)) in series.iter().enumerate() {
            let max = pts.iter().map(|p| p.1).fold(0.0f32, f32::max);
            let scale = if max > 0.0 { 1.0 / max as f64 } else { 0.0 };
            let color = colors[si % colors.len()];
            let points: Vec<String> = pts
                .iter()
                .map(|&(i, v)| format!("{:.1},{:.1}", x_of(i), top + ph * (1.0 - v as f64 * scale)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                points.join(" ")
            );
            let ly = top + 14.0 + 16.0 * si as f64;
            let lx = left + pw + 10.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{ly:.1}">{} (max {max:.3})</text>"#,
                ly - 4.0,
                lx + 18.0,
                ly - 4.0,
                lx + 22.0,
                xml_escape(name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
