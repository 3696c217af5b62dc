//! Criterion benches of the CPU linear kernels.
fn main() {}
