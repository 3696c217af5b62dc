//! Shared by the fuzz targets: scratch files in memory-backed storage where available.

use std::path::PathBuf;

/// A folder for the target's scratch files: `/dev/shm` when it exists (no disk writes
/// per execution), the system temp folder otherwise.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    let base = if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    };
    tempfile::tempdir_in(base).expect("a scratch folder")
}
