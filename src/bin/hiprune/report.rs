//! Small helpers shared by the CLI's reports: machine description, sizes, tables.

use std::fmt::Write as _;

use serde::Serialize;

/// The CPU model name, from /proc/cpuinfo where readable.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The git revision the binary was built from (or "unknown").
pub fn git_revision() -> &'static str {
    option_env!("HIPRUNE_GIT_REVISION").unwrap_or("unknown")
}

/// Bytes as a human size (KiB, MiB, GiB).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// A plain-text table with right-aligned columns (the first left-aligned).
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (one cell per column).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders the table.
    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            for (i, cell) in cells.iter().enumerate().take(cols) {
                if i == 0 {
                    let _ = write!(out, "{cell:<w$}", w = widths[i]);
                } else {
                    let _ = write!(out, "  {cell:>w$}", w = widths[i]);
                }
            }
            out.push('\n');
        };
        line(&mut out, &self.header);
        let total: usize = widths.iter().sum::<usize>() + 2 * (cols.saturating_sub(1));
        out.push_str(&"-".repeat(total));
        out.push('\n');
        for row in &self.rows {
            line(&mut out, row);
        }
        out
    }
}

/// How a bench report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// A human table.
    Table,
    /// One JSON document.
    Json,
    /// CSV rows after `# key: value` comment lines holding the header.
    Csv,
}

impl OutputFormat {
    /// The format the `--json` / `--csv` flags ask for (clap keeps them exclusive).
    pub fn from_flags(json: bool, csv: bool) -> Self {
        match (json, csv) {
            (true, _) => OutputFormat::Json,
            (false, true) => OutputFormat::Csv,
            _ => OutputFormat::Table,
        }
    }
}

/// The GPU a CUDA report ran on.
#[derive(Debug, Clone, Serialize)]
pub struct GpuInfo {
    /// Card name.
    pub name: String,
    /// Driver version.
    pub driver: String,
    /// CUDA runtime version.
    pub cuda_version: String,
    /// Total device memory in bytes.
    pub memory_bytes: u64,
}

/// The machine and build a bench report was measured on; printed at the top of every
/// report of `hiprune bench`.
#[derive(Debug, Clone, Serialize)]
pub struct ReportHeader {
    /// hiprune version (Cargo.toml).
    pub version: String,
    /// Git revision of the build.
    pub git_revision: String,
    /// Operating system and kernel release.
    pub os: String,
    /// CPU model name.
    pub cpu: String,
    /// Logical CPUs the process may use.
    pub cpu_threads_available: usize,
    /// Threads the measurement used.
    pub threads: usize,
    /// SIMD path of the CPU kernels.
    pub kernel_path: String,
    /// `cpu` or `cuda`.
    pub backend: String,
    /// The card, driver and CUDA version (CUDA reports only).
    pub gpu: Option<GpuInfo>,
}

impl ReportHeader {
    /// Collects the header for a report on `backend` run with `threads` threads.
    pub fn collect(backend: &str, threads: usize, gpu: Option<GpuInfo>) -> Self {
        ReportHeader {
            version: hiprune::VERSION.to_string(),
            git_revision: git_revision().to_string(),
            os: os_description(),
            cpu: cpu_model(),
            cpu_threads_available: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            threads,
            kernel_path: hiprune::backend::cpu::KernelPath::detect().to_string(),
            backend: backend.to_string(),
            gpu,
        }
    }

    /// `(key, value)` pairs in print order.
    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            (
                "hiprune",
                format!("{} (rev {})", self.version, self.git_revision),
            ),
            ("os", self.os.clone()),
            ("cpu", self.cpu.clone()),
            (
                "threads",
                format!(
                    "{} used of {} available",
                    self.threads, self.cpu_threads_available
                ),
            ),
            ("kernel path", self.kernel_path.clone()),
            ("backend", self.backend.clone()),
        ];
        if let Some(gpu) = &self.gpu {
            out.push((
                "gpu",
                format!(
                    "{} ({}), driver {}, CUDA {}",
                    gpu.name,
                    human_bytes(gpu.memory_bytes),
                    gpu.driver,
                    gpu.cuda_version
                ),
            ));
        }
        out
    }

    /// The header as text lines, for the human table.
    pub fn text(&self, title: &str) -> String {
        let mut out = format!("{title}\n");
        for (key, value) in self.fields() {
            let _ = writeln!(out, "  {key:<12} {value}");
        }
        out
    }

    /// The header as `# key: value` lines, for CSV output.
    pub fn csv_comments(&self) -> String {
        let mut out = String::new();
        for (key, value) in self.fields() {
            let _ = writeln!(out, "# {key}: {value}");
        }
        out
    }
}

/// `PRETTY_NAME` of /etc/os-release (or the OS family) plus the kernel release.
pub fn os_description() -> String {
    let name = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|s| s.trim().trim_matches('"').to_string())
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    match std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        Ok(release) => format!("{name}, kernel {}", release.trim()),
        Err(_) => name,
    }
}

/// One CSV line from `cells` (quoted where a cell holds a comma, quote or newline).
pub fn csv_line(cells: &[String]) -> String {
    let mut out = cells
        .iter()
        .map(|c| {
            if c.contains([',', '"', '\n']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    out
}
