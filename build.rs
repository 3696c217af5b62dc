//! Build script. Records the git revision for reports. With the `cuda` feature it also
//! compiles every `cuda/*.cu` with nvcc (through the `cc` crate) into a static library,
//! links the static CUDA runtime, and reports the kernels' register use and spills.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Some(rev) = git_revision() {
        println!("cargo:rustc-env=HIPRUNE_GIT_REVISION={rev}");
    }
    #[cfg(feature = "cuda")]
    cuda::build();
}

/// `git describe`-style short revision, with `-dirty` when the tree has changes.
fn git_revision() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut rev = String::from_utf8(out.stdout).ok()?.trim().to_string();
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    if dirty {
        rev.push_str("-dirty");
    }
    Some(rev)
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::env;
    use std::path::{Path, PathBuf};

    /// Compute capabilities built when `HIPRUNE_CUDA_ARCHS` is unset: Jetson Orin
    /// (sm_87) and Hopper (sm_90).
    const DEFAULT_ARCHS: &str = "87;90";

    /// Environment variables that change what this script does.
    const ENV_VARS: &[&str] = &[
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "HIPRUNE_CUDA_ARCHS",
        "HIPRUNE_FAIL_ON_SPILLS",
    ];

    pub fn build() {
        println!("cargo:rerun-if-changed=cuda");
        println!("cargo:rerun-if-changed=include");
        for var in ENV_VARS {
            println!("cargo:rerun-if-env-changed={var}");
        }

        let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
        let nvcc = find_nvcc().unwrap_or_else(|tried| {
            panic!(
                "the `cuda` feature needs nvcc, the CUDA compiler, and none was found \
                 (looked at {tried}). Point at one with NVCC=/path/to/nvcc, or set \
                 CUDA_HOME (or CUDA_PATH) to the toolkit folder that holds bin/nvcc, or put \
                 nvcc on PATH. A CUDA 13.0 toolkit installs from PyPI: pip install \
                 --target DIR nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
                 nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88, \
                 then CUDA_HOME=DIR/nvidia/cu13"
            )
        });
        let cuda_home = cuda_home(&nvcc);
        let archs = parse_archs();

        let mut sources: Vec<PathBuf> = std::fs::read_dir("cuda")
            .map(|dir| {
                dir.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                    .collect()
            })
            .unwrap_or_default();
        sources.sort();

        // cc takes nvcc from NVCC; `.compiler()` would make it treat nvcc as a host
        // compiler and pass host flags without -Xcompiler.
        // SAFETY: the build script has one thread at this point, so nothing reads the
        // environment while it changes.
        unsafe { env::set_var("NVCC", &nvcc) };
        let mut build = cc::Build::new();
        build
            .cuda(true)
            .cudart("static")
            // No -G: device debug info turns optimisation off and hides the real
            // register use; the kernels are always built optimised.
            .debug(false)
            .opt_level(3)
            .include("cuda")
            .include("include")
            .flag("-std=c++17")
            .flag("-Xptxas=-v");
        for arch in &archs {
            build.flag(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
        }
        // PTX for the lowest architecture, so newer GPUs JIT-compile it at load time.
        let lowest = &archs[0];
        build.flag(format!(
            "-gencode=arch=compute_{lowest},code=compute_{lowest}"
        ));

        // Each .cu is compiled on its own (whole-program, no relocatable device code), so
        // no device-link step is needed; the objects are compiled here rather than by
        // `cc::Build::compile` so that ptxas' report can be captured.
        let compiler = build
            .try_get_compiler()
            .unwrap_or_else(|e| panic!("cannot set up nvcc {}: {e}", nvcc.display()));
        let jobs: Vec<_> = sources
            .iter()
            .map(|src| {
                let stem = src.file_stem().unwrap_or_default().to_string_lossy();
                let obj = out_dir.join(format!("{stem}.o"));
                let mut cmd = compiler.to_command();
                cmd.arg("-c").arg(src).arg("-o").arg(&obj);
                (src.clone(), obj, cmd)
            })
            .collect();
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(src, obj, mut cmd)| {
                std::thread::spawn(move || {
                    let out = cmd.output();
                    (src, obj, format!("{cmd:?}"), out)
                })
            })
            .collect();

        let mut log = String::new();
        let mut objects = Vec::new();
        for handle in handles {
            let (src, obj, cmd, out) = handle.join().expect("nvcc thread");
            let out = out.unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            log.push_str(&format!("### {}\n{stdout}{stderr}\n", src.display()));
            if !out.status.success() {
                panic!(
                    "nvcc failed on {} ({}):\n{cmd}\n{stdout}{stderr}",
                    src.display(),
                    out.status
                );
            }
            objects.push(obj);
        }
        let log_path = out_dir.join("ptxas.log");
        std::fs::write(&log_path, &log)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", log_path.display()));
        report_spills(&log, &log_path);

        // The static library: objects only, archived by cc, which also emits
        // `-lcudart_static` and the C++ runtime.
        if objects.is_empty() {
            // Nothing to archive; a program that calls a launcher then fails to link,
            // naming the missing kernel.
            println!(
                "cargo:warning=the `cuda` feature found no cuda/*.cu; the launchers are not built"
            );
            return;
        }
        build.objects(&objects);
        build.compile("hiprune_cuda");
        link_search(&cuda_home);
        for lib in ["dl", "pthread", "rt"] {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
    }

    /// `NVCC`, then `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, then `nvcc` on `PATH`.
    /// On failure, the list of places looked at.
    fn find_nvcc() -> Result<PathBuf, String> {
        let mut tried = Vec::new();
        if let Some(p) = env::var_os("NVCC") {
            let p = PathBuf::from(p);
            if p.is_file() {
                return Ok(p);
            }
            tried.push(format!("NVCC={}", p.display()));
        }
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(home) = env::var_os(var) {
                let p = Path::new(&home).join("bin").join("nvcc");
                if p.is_file() {
                    return Ok(p);
                }
                tried.push(format!("{var}/bin/nvcc = {}", p.display()));
            } else {
                tried.push(format!("{var} (unset)"));
            }
        }
        if let Some(path) = env::var_os("PATH") {
            for dir in env::split_paths(&path) {
                let p = dir.join("nvcc");
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        tried.push("nvcc on PATH".to_string());
        Err(tried.join(", "))
    }

    /// The toolkit folder: CUDA_HOME, CUDA_PATH, or the folder above nvcc's `bin/`.
    fn cuda_home(nvcc: &Path) -> PathBuf {
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(home) = env::var_os(var) {
                return PathBuf::from(home);
            }
        }
        let nvcc = nvcc.canonicalize().unwrap_or_else(|_| nvcc.to_path_buf());
        nvcc.parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// Every library folder of the toolkit that exists: `lib64` (Linux installers),
    /// `lib` (the PyPI wheels), `targets/<arch>-linux/lib` (JetPack, cross layouts).
    fn link_search(home: &Path) {
        let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
        let candidates = [
            home.join("lib64"),
            home.join("lib"),
            home.join("targets")
                .join(format!("{arch}-linux"))
                .join("lib"),
            home.join("targets").join("sbsa-linux").join("lib"),
        ];
        for dir in candidates {
            if dir.is_dir() {
                println!("cargo:rustc-link-search=native={}", dir.display());
            }
        }
    }

    /// `HIPRUNE_CUDA_ARCHS` (`;`- or `,`-separated compute capabilities such as `87;90`),
    /// sorted so that the lowest, which also gets PTX, comes first.
    fn parse_archs() -> Vec<String> {
        let raw = env::var("HIPRUNE_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
        let mut archs: Vec<String> = raw
            .split([';', ','])
            .map(|s| s.trim().trim_start_matches("sm_").to_string())
            .filter(|s| !s.is_empty())
            .collect();
        for a in &archs {
            let digits: String = a.chars().take_while(char::is_ascii_digit).collect();
            let suffix = &a[digits.len()..];
            if digits.len() < 2 || !(suffix.is_empty() || suffix == "a" || suffix == "f") {
                panic!(
                    "HIPRUNE_CUDA_ARCHS={raw:?}: `{a}` is not a compute capability \
                     (write e.g. 87;90 or 90a)"
                );
            }
        }
        if archs.is_empty() {
            panic!("HIPRUNE_CUDA_ARCHS={raw:?} names no architecture (write e.g. 87;90)");
        }
        archs.sort_by_key(|a| {
            let digits: String = a.chars().take_while(char::is_ascii_digit).collect();
            (digits.parse::<u32>().unwrap_or(u32::MAX), a.clone())
        });
        archs.dedup();
        archs
    }

    /// One kernel on one architecture, as ptxas reported it.
    #[derive(Default)]
    struct KernelReport {
        name: String,
        arch: String,
        registers: Option<u32>,
        spill_stores: u64,
        spill_loads: u64,
        stack: u64,
    }

    /// Parses ptxas' `-v` report: prints a warning per kernel that spills and fails the
    /// build under `HIPRUNE_FAIL_ON_SPILLS=1` when a GEMV/GEMM kernel spills.
    fn report_spills(log: &str, log_path: &Path) {
        let kernels = parse_ptxas(log);
        let fail_on_spills = env::var("HIPRUNE_FAIL_ON_SPILLS").is_ok_and(|v| v == "1");
        let mut failures = Vec::new();
        for k in &kernels {
            if k.spill_stores == 0 && k.spill_loads == 0 {
                continue;
            }
            let regs = k.registers.map_or("?".to_string(), |r| r.to_string());
            println!(
                "cargo:warning=ptxas: {} ({}): {regs} registers, {} B stack, spills {} B stored / {} B loaded (full report: {})",
                k.name,
                k.arch,
                k.stack,
                k.spill_stores,
                k.spill_loads,
                log_path.display()
            );
            if k.name.contains("gemv") || k.name.contains("gemm") {
                failures.push(format!("{} ({})", k.name, k.arch));
            }
        }
        if fail_on_spills && !failures.is_empty() {
            panic!(
                "HIPRUNE_FAIL_ON_SPILLS=1 and these GEMV/GEMM kernels spill registers: {}; see {}",
                failures.join(", "),
                log_path.display()
            );
        }
    }

    fn parse_ptxas(log: &str) -> Vec<KernelReport> {
        let mut kernels: Vec<KernelReport> = Vec::new();
        let mut current: Option<usize> = None;
        for line in log.lines() {
            let line = line.trim();
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                let mut parts = rest.split('\'');
                let name = parts.next().unwrap_or_default();
                let arch = parts.nth(1).unwrap_or_default();
                kernels.push(KernelReport {
                    name: demangle(name),
                    arch: arch.to_string(),
                    ..KernelReport::default()
                });
                current = Some(kernels.len() - 1);
            } else if line.contains("Function properties for") {
                // Properties of a non-entry function belong to no kernel line of ours.
                let name = line.rsplit(' ').next().unwrap_or_default();
                if current.is_some_and(|i| kernels[i].name != demangle(name)) {
                    current = None;
                }
            } else if line.contains("bytes spill stores") {
                if let Some(i) = current {
                    let nums = numbers(line);
                    // "<stack> bytes stack frame, <st> bytes spill stores, <ld> bytes spill loads"
                    if nums.len() >= 3 {
                        kernels[i].stack = nums[0];
                        kernels[i].spill_stores = nums[1];
                        kernels[i].spill_loads = nums[2];
                    }
                }
            } else if line.contains("Used ")
                && line.contains(" registers")
                && let Some(i) = current
            {
                kernels[i].registers = numbers(line).first().map(|&r| r as u32);
            }
        }
        kernels
    }

    fn numbers(line: &str) -> Vec<u64> {
        line.split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    /// A readable name of an Itanium-mangled kernel symbol: the qualified name without
    /// anonymous namespaces plus integer template arguments (`_Z4gemvILi4EEv...` ->
    /// `gemv<4>`, `_ZN2hp4gemvE...` -> `hp::gemv`); other names unchanged.
    fn demangle(sym: &str) -> String {
        let Some(after) = sym.strip_prefix("_Z") else {
            return sym.to_string();
        };
        let (name, rest) = demangle_name(after);
        if name.is_empty() {
            return sym.to_string();
        }
        // Template arguments right after the name: I (L<type><int>E)* E.
        let Some(mut args) = rest.strip_prefix('I') else {
            return name;
        };
        let mut values = Vec::new();
        while let Some(lit) = args.strip_prefix('L') {
            let lit = lit.trim_start_matches(|c: char| c.is_ascii_alphabetic());
            let Some(end) = lit.find('E') else { break };
            values.push(lit[..end].replace('n', "-"));
            args = &lit[end + 1..];
        }
        if args.starts_with('E') && !values.is_empty() {
            format!("{name}<{}>", values.join(","))
        } else {
            format!("{name}<...>")
        }
    }

    /// The name part of a mangled symbol (after `_Z`) and what follows it.
    fn demangle_name(sym: &str) -> (String, &str) {
        let mut rest = sym;
        let nested = rest.starts_with('N');
        if nested {
            rest = &rest[1..];
        }
        let mut parts = Vec::new();
        loop {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let Ok(len) = digits.parse::<usize>() else {
                break;
            };
            rest = &rest[digits.len()..];
            if rest.len() < len {
                break;
            }
            if !rest[..len].starts_with("_GLOBAL__N") {
                parts.push(&rest[..len]);
            }
            rest = &rest[len..];
            if !nested {
                break;
            }
        }
        (parts.join("::"), rest)
    }
}
