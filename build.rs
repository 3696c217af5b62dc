//! Build script. Records the git revision for reports. Without the `cuda` feature it
//! does nothing else; the CUDA backend hooks in here to compile `cuda/*.cu` with nvcc.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Some(rev) = git_revision() {
        println!("cargo:rustc-env=HIPRUNE_GIT_REVISION={rev}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rerun-if-changed=cuda");
        println!("cargo:rerun-if-changed=include");
        println!(
            "cargo:warning=the `cuda` feature has no kernels yet; the build continues without them"
        );
    }
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
