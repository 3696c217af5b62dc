//! Writing a package atomically. (Being written.)

/// Streams tensors into a new package.
pub struct PackageWriter {}
