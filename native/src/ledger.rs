//! Ledger entry hashes: what each entry's `previous_hash` names.
//!
//! ```text
//! hash = H(K_entry, len(body) || body || signature)
//! ```
//! `H(K, m)` is BLAKE3's keyed hash with `K_entry` = BLAKE3 `derive_key` of
//! [`ENTRY_CONTEXT`]; `len` is a little-endian u32. The signature is part of the hash, so an
//! entry re-signed with another (equally valid) signature is a different entry.

use std::sync::LazyLock;

use crate::error::{Error, Result};

pub const ENTRY_CONTEXT: &str = "swarmserve v1 ledger entry";
pub const SIGNATURE_LEN: usize = 64;

static ENTRY_KEY: LazyLock<[u8; 32]> = LazyLock::new(|| blake3::derive_key(ENTRY_CONTEXT, b""));

pub fn entry_hash(body: &[u8], signature: &[u8]) -> Result<[u8; 32]> {
    if signature.len() != SIGNATURE_LEN {
        return Err(Error::InvalidArgument(format!(
            "entry signature must be {SIGNATURE_LEN} bytes, got {}",
            signature.len()
        )));
    }
    let length =
        u32::try_from(body.len()).map_err(|_| Error::InvalidArgument("entry body is longer than 4 GiB".into()))?;
    let mut hasher = blake3::Hasher::new_keyed(&ENTRY_KEY);
    hasher.update(&length.to_le_bytes());
    hasher.update(body);
    hasher.update(signature);
    Ok(*hasher.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_covers_body_and_signature_and_is_domain_separated() {
        let signature = [7u8; 64];
        let base = entry_hash(b"body", &signature).unwrap();
        assert_ne!(base, entry_hash(b"bodz", &signature).unwrap());
        assert_ne!(base, entry_hash(b"body", &[8u8; 64]).unwrap());
        // Not the plain BLAKE3 of the same bytes: another context cannot collide with it.
        let mut plain = Vec::from(4u32.to_le_bytes());
        plain.extend_from_slice(b"body");
        plain.extend_from_slice(&signature);
        assert_ne!(base, *blake3::hash(&plain).as_bytes());
        assert!(entry_hash(b"body", &[0u8; 63]).is_err());
    }
}
