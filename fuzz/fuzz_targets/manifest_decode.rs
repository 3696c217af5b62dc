//! Postcard manifest decoding alone.
//!
//! Invariant: decoding never panics and never allocates beyond what the input can
//! describe; a decoded manifest re-encodes to bytes that decode and re-encode unchanged.

#![no_main]

use hiprune::Error;
use hiprune::format::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Manifest::decode(data) {
        Ok(manifest) => {
            // Compared as bytes: float fields may hold NaN, which is never == itself.
            let bytes = manifest.encode().expect("a decoded manifest encodes");
            let again = Manifest::decode(&bytes).expect("re-decodes");
            assert_eq!(again.encode().expect("encodes again"), bytes);
        }
        Err(Error::ManifestCorrupt { .. } | Error::UnsupportedFormatVersion { .. }) => {}
        Err(other) => panic!("unexpected error kind: {other}"),
    }
});
