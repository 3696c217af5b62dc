//! Reading whole files with a size cap, so a file that declares or is absurdly large
//! is refused before a buffer of that size exists.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Reads all of `path` if it holds at most `max` bytes; [`Error::FileTooLarge`] otherwise.
pub(crate) fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > max {
        return Err(Error::FileTooLarge {
            path: path.to_path_buf(),
            len,
            max,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take` guards against a file that grows while it is read.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(Error::FileTooLarge {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}

/// [`read_capped`] for a UTF-8 text file.
pub(crate) fn read_text_capped(path: &Path, max: u64) -> Result<String> {
    String::from_utf8(read_capped(path, max)?).map_err(|_| Error::InvalidHeader {
        path: path.to_path_buf(),
        reason: "the file is not UTF-8 text".to_string(),
    })
}
