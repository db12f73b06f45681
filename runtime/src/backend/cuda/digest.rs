//! The content digest of a CUDA generation, computed from what the device holds.
//!
//! `Manifest::content_digest` is the xxh3-128 of every arena's used bytes, arena after arena,
//! in the spelling of [`crate::backend::digest_bytes`]. The owner computes it twice: over the
//! chunks it staged (what it meant to upload) and over the device's contents read back
//! ([`device_digest`]); the two must agree before anything is exported. A worker (and an owner
//! that adopts an existing generation) recomputes it from its own mapping of the arenas before
//! it reports ready, so a worker never serves from memory that is not the model's compute copy.
//!
//! The read-back goes through two pinned buffers so that the copy of one chunk overlaps the
//! hashing of the other. A checksum kernel would be faster still, but would need NVRTC on
//! every serving machine; the driver alone is enough for this.

use super::driver::{DeviceMemory, Stager};
use crate::backend::{BackendError, ManifestError};

/// Prefix of every content digest.
pub const PREFIX: &str = "xxh3-128:";

/// An incremental [`crate::backend::digest_bytes`].
#[derive(Clone)]
pub struct ContentHasher(xxhash_rust::xxh3::Xxh3);

impl std::fmt::Debug for ContentHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentHasher")
    }
}

impl Default for ContentHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl ContentHasher {
    pub fn new() -> Self {
        Self(xxhash_rust::xxh3::Xxh3::new())
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest in manifest spelling.
    pub fn finish(&self) -> String {
        format!("{PREFIX}{:032x}", self.0.digest128())
    }
}

/// Checks that `digest` is spelled as this backend writes it (so that a manifest from
/// something else is refused before CUDA is touched).
pub fn check_spelling(digest: &str) -> Result<(), BackendError> {
    let ok = digest
        .strip_prefix(PREFIX)
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadContentDigest {
            digest: digest.to_string(),
            prefix: PREFIX,
        }
        .into())
    }
}

/// Reads `used` bytes of every arena back from the device and hashes them, in order.
pub fn device_digest(
    stager: &mut Stager,
    arenas: &[(&dyn DeviceMemory, u64)],
) -> Result<String, BackendError> {
    let mut hasher = ContentHasher::new();
    for &(mem, used) in arenas {
        stager.download(mem, used, |chunk| hasher.update(chunk))?;
    }
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_hashing_matches_the_manifest_spelling() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = ContentHasher::new();
        for c in data.chunks(999) {
            h.update(c);
        }
        let d = h.finish();
        assert_eq!(d, crate::backend::digest_bytes(&[&data]));
        check_spelling(&d).unwrap();
        assert_eq!(
            ContentHasher::new().finish(),
            crate::backend::digest_bytes(&[])
        );
    }

    #[test]
    fn misspelled_digests_are_refused() {
        for bad in [
            "",
            "xxh3-128:",
            "xxh3-128:0123",
            "blake3:00000000000000000000000000000000",
            "xxh3-128:0000000000000000000000000000000g",
            "xxh3-128:000000000000000000000000000000000",
        ] {
            assert!(check_spelling(bad).is_err(), "{bad:?}");
        }
    }
}
