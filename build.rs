//! Build script. Without the `cuda` feature it does nothing; the CUDA backend hooks in
//! here to compile `cuda/*.cu` with nvcc.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rerun-if-changed=cuda");
        println!("cargo:rerun-if-changed=include");
        println!(
            "cargo:warning=the `cuda` feature has no kernels yet; the build continues without them"
        );
    }
}
