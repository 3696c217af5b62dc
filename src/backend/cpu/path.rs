//! Runtime choice of the SIMD code path.

use crate::error::{Error, Result};

/// A SIMD code path of the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelPath {
    /// Plain Rust written so the compiler vectorises it; the path on aarch64 and on any
    /// CPU without the x86 extensions below.
    Portable,
    /// x86_64 AVX2 + FMA.
    Avx2,
    /// x86_64 AVX-512 (F, BW, VL, DQ).
    Avx512,
    /// AVX-512 plus VNNI integer dot products (used by the int8-activation mode).
    Avx512Vnni,
}

impl KernelPath {
    /// Every path this CPU can run, slowest first.
    pub fn available() -> Vec<KernelPath> {
        let mut paths = vec![KernelPath::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                paths.push(KernelPath::Avx2);
            }
            let avx512 = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512dq");
            if avx512 {
                paths.push(KernelPath::Avx512);
                if std::arch::is_x86_feature_detected!("avx512vnni") {
                    paths.push(KernelPath::Avx512Vnni);
                }
            }
        }
        paths
    }

    /// The fastest path this CPU can run, detected once per process.
    /// `HIPRUNE_CPU_PATH=portable|avx2|avx512|avx512vnni` picks another one (a path the
    /// CPU lacks is ignored).
    pub fn detect() -> KernelPath {
        static DETECTED: std::sync::OnceLock<KernelPath> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(Self::detect_uncached)
    }

    fn detect_uncached() -> KernelPath {
        let available = Self::available();
        let best = *available.last().unwrap_or(&KernelPath::Portable);
        match std::env::var("HIPRUNE_CPU_PATH")
            .ok()
            .and_then(|s| Self::parse(&s))
        {
            Some(cap) if available.contains(&cap) => cap,
            _ => best,
        }
    }

    /// [`Error::Unsupported`] unless this CPU can run the path.
    pub fn ensure_available(self) -> Result<()> {
        if Self::available().contains(&self) {
            Ok(())
        } else {
            Err(Error::Unsupported {
                what: format!("the {self} kernel path on this CPU"),
            })
        }
    }

    /// Parses a path name (`portable`, `avx2`, `avx512`, `avx512vnni`).
    pub fn parse(name: &str) -> Option<KernelPath> {
        match name.to_ascii_lowercase().as_str() {
            "portable" => Some(KernelPath::Portable),
            "avx2" => Some(KernelPath::Avx2),
            "avx512" => Some(KernelPath::Avx512),
            "avx512vnni" => Some(KernelPath::Avx512Vnni),
            _ => None,
        }
    }

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Portable => "portable",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512 => "avx512",
            KernelPath::Avx512Vnni => "avx512vnni",
        }
    }
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
