//! Token-stream commitments: a BLAKE3 hash chain over a stream header and every served token.
//!
//! ```text
//! h_0 = H(K_header, len(request_id) || request_id || model_digest || prompt_digest
//!                   || len(sampling) || sampling)
//! h_i = H(K_link,   h_{i-1} || i || token_id || len(text) || text)      for i = 1..n
//! C   = H(K_commit, h_n || n)
//! ```
//! `H(K, m)` is BLAKE3's keyed hash; each `K_x` is BLAKE3 `derive_key` of a context string,
//! so the three hashes are domain-separated. Integers are little-endian (lengths u32, indices
//! and counts u64, token ids u32). The inference node signs `C`; anyone holding the tokens can
//! recompute it, incrementally or in one call.

use std::sync::LazyLock;

use crate::error::{Error, Result};

pub const HEADER_CONTEXT: &str = "swarmserve v1 token-stream header";
pub const LINK_CONTEXT: &str = "swarmserve v1 token-stream link";
pub const COMMIT_CONTEXT: &str = "swarmserve v1 token-stream commitment";
pub const DIGEST_LEN: usize = 32;

static HEADER_KEY: LazyLock<[u8; 32]> = LazyLock::new(|| blake3::derive_key(HEADER_CONTEXT, b""));
static LINK_KEY: LazyLock<[u8; 32]> = LazyLock::new(|| blake3::derive_key(LINK_CONTEXT, b""));
static COMMIT_KEY: LazyLock<[u8; 32]> = LazyLock::new(|| blake3::derive_key(COMMIT_CONTEXT, b""));

fn len_u32(field: &str, bytes: &[u8]) -> Result<[u8; 4]> {
    u32::try_from(bytes.len())
        .map(u32::to_le_bytes)
        .map_err(|_| Error::InvalidArgument(format!("{field} is longer than 4 GiB")))
}

fn digest32(field: &str, bytes: &[u8]) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| Error::InvalidArgument(format!("{field} must be {DIGEST_LEN} bytes, got {}", bytes.len())))
}

/// The incremental hasher an inference node feeds as it emits tokens.
#[derive(Clone, Debug)]
pub struct TokenStreamHasher {
    head: [u8; 32],
    count: u64,
}

impl TokenStreamHasher {
    pub fn new(request_id: &[u8], model_digest: &[u8], prompt_digest: &[u8], sampling: &[u8]) -> Result<Self> {
        let model_digest = digest32("model_digest", model_digest)?;
        let prompt_digest = digest32("prompt_digest", prompt_digest)?;
        let mut hasher = blake3::Hasher::new_keyed(&HEADER_KEY);
        hasher.update(&len_u32("request_id", request_id)?);
        hasher.update(request_id);
        hasher.update(&model_digest);
        hasher.update(&prompt_digest);
        hasher.update(&len_u32("sampling", sampling)?);
        hasher.update(sampling);
        Ok(Self {
            head: *hasher.finalize().as_bytes(),
            count: 0,
        })
    }

    /// Extends the chain by one token: its id and the exact text bytes sent for it.
    pub fn update(&mut self, token_id: u32, text: &[u8]) -> Result<()> {
        let index = self.count + 1;
        let text_len = len_u32("token text", text)?;
        // Most token texts are a few bytes: build the message on the stack.
        let mut small = [0u8; 32 + 8 + 4 + 4 + 64];
        let fixed = 32 + 8 + 4 + 4;
        let write_fixed = |buf: &mut [u8]| {
            buf[..32].copy_from_slice(&self.head);
            buf[32..40].copy_from_slice(&index.to_le_bytes());
            buf[40..44].copy_from_slice(&token_id.to_le_bytes());
            buf[44..48].copy_from_slice(&text_len);
        };
        let next = if text.len() <= small.len() - fixed {
            write_fixed(&mut small);
            small[fixed..fixed + text.len()].copy_from_slice(text);
            blake3::keyed_hash(&LINK_KEY, &small[..fixed + text.len()])
        } else {
            let mut prefix = [0u8; 48];
            write_fixed(&mut prefix);
            let mut hasher = blake3::Hasher::new_keyed(&LINK_KEY);
            hasher.update(&prefix);
            hasher.update(text);
            hasher.finalize()
        };
        self.head = *next.as_bytes();
        self.count = index;
        Ok(())
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The current link `h_count` (the header hash before any token).
    pub fn head(&self) -> [u8; 32] {
        self.head
    }

    /// The commitment over every token so far. The hasher stays usable.
    pub fn commitment(&self) -> [u8; 32] {
        let mut message = [0u8; 40];
        message[..32].copy_from_slice(&self.head);
        message[32..].copy_from_slice(&self.count.to_le_bytes());
        *blake3::keyed_hash(&COMMIT_KEY, &message).as_bytes()
    }
}

/// The whole-stream form a verifier uses: one call for every token.
pub fn token_stream_commitment<T: AsRef<[u8]>>(
    request_id: &[u8],
    model_digest: &[u8],
    prompt_digest: &[u8],
    sampling: &[u8],
    token_ids: &[u32],
    texts: &[T],
) -> Result<[u8; 32]> {
    if token_ids.len() != texts.len() {
        return Err(Error::InvalidArgument(format!(
            "{} token ids but {} texts",
            token_ids.len(),
            texts.len()
        )));
    }
    let mut hasher = TokenStreamHasher::new(request_id, model_digest, prompt_digest, sampling)?;
    for (id, text) in token_ids.iter().zip(texts) {
        hasher.update(*id, text.as_ref())?;
    }
    Ok(hasher.commitment())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> TokenStreamHasher {
        TokenStreamHasher::new(b"req-1", &[1; 32], &[2; 32], b"greedy").unwrap()
    }

    #[test]
    fn incremental_equals_batch() {
        let texts: Vec<Vec<u8>> = (0..100).map(|i| vec![b'a' + (i % 26) as u8; i % 80]).collect();
        let ids: Vec<u32> = (0..100).collect();
        let mut h = header();
        for (id, t) in ids.iter().zip(&texts) {
            h.update(*id, t).unwrap();
        }
        let batch = token_stream_commitment(b"req-1", &[1; 32], &[2; 32], b"greedy", &ids, &texts).unwrap();
        assert_eq!(h.commitment(), batch);
        assert_eq!(h.count(), 100);
    }

    #[test]
    fn every_field_changes_the_commitment() {
        let base = token_stream_commitment(b"r", &[1; 32], &[2; 32], b"s", &[7, 8], &[b"a", b"b"]).unwrap();
        let variants = [
            token_stream_commitment(b"R", &[1; 32], &[2; 32], b"s", &[7, 8], &[b"a", b"b"]),
            token_stream_commitment(b"r", &[9; 32], &[2; 32], b"s", &[7, 8], &[b"a", b"b"]),
            token_stream_commitment(b"r", &[1; 32], &[9; 32], b"s", &[7, 8], &[b"a", b"b"]),
            token_stream_commitment(b"r", &[1; 32], &[2; 32], b"S", &[7, 8], &[b"a", b"b"]),
            token_stream_commitment(b"r", &[1; 32], &[2; 32], b"s", &[7, 9], &[b"a", b"b"]),
            token_stream_commitment(b"r", &[1; 32], &[2; 32], b"s", &[7, 8], &[b"a", b"c"]),
            token_stream_commitment(b"r", &[1; 32], &[2; 32], b"s", &[8, 7], &[b"b", b"a"]),
            token_stream_commitment(b"r", &[1; 32], &[2; 32], b"s", &[7], &[b"a"]),
        ];
        for v in variants {
            assert_ne!(v.unwrap(), base);
        }
    }

    #[test]
    fn length_prefixes_prevent_shifting_bytes_between_fields() {
        let a = token_stream_commitment(b"r", &[1; 32], &[2; 32], b"s", &[1, 1], &[&b"ab"[..], b"c"]).unwrap();
        let b = token_stream_commitment(b"r", &[1; 32], &[2; 32], b"s", &[1, 1], &[&b"a"[..], b"bc"]).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn long_texts_take_the_streaming_path_consistently() {
        let long = vec![b'x'; 1000];
        let mut h = header();
        h.update(5, &long).unwrap();
        let mut manual = blake3::Hasher::new_keyed(&LINK_KEY);
        manual.update(&header().head());
        manual.update(&1u64.to_le_bytes());
        manual.update(&5u32.to_le_bytes());
        manual.update(&1000u32.to_le_bytes());
        manual.update(&long);
        assert_eq!(h.head(), *manual.finalize().as_bytes());
    }

    #[test]
    fn rejects_bad_digests_and_mismatched_lengths() {
        assert!(matches!(
            TokenStreamHasher::new(b"r", &[0; 31], &[0; 32], b""),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            TokenStreamHasher::new(b"r", &[0; 32], &[0; 33], b""),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            token_stream_commitment(b"r", &[0; 32], &[0; 32], b"", &[1, 2], &[b"a"]),
            Err(Error::InvalidArgument(_))
        ));
    }
}
