//! The host-side compression toolchain (feature `compress`): from a diffusers
//! checkpoint to a pruned, 4-bit `.hpk` package.
//!
//! - [`generate`]: seeded random checkpoints with the real shapes, for tests and
//!   benchmarks.
//! - [`analyze`]: per-block and per-sub-component removal impact, the block-influence
//!   proxy and a data-free weight score; [`report`] holds the JSON/SVG report.
//! - [`plan`]: Hierarchical Position Pruning, Positional Weight Preservation and
//!   Sensitivity-Guided Distillation weights.
//! - [`quantize`]: streams the checkpoint tensor by tensor into a package.

pub mod analyze;
pub mod generate;
pub mod plan;
pub mod quantize;
pub mod report;

pub use analyze::{AnalyzeOptions, analyze_model, weight_scores};
pub use generate::{
    GenerateOptions, GenerateSummary, Preset, generate_checkpoint, generate_single_file,
};
pub use plan::{Plan, PlanOptions, PlanTarget, ProtectPrecision, make_plan};
pub use quantize::{
    CompressOptions, CompressSummary, Progress, WeightFormat, compress_checkpoint, compress_opened,
};
pub use report::{BlockScores, ComponentScore, SensitivityReport};
