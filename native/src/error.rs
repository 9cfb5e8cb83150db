//! The one error type of the native core. Each variant becomes its own Python exception in
//! `python.rs`, so callers can tell a tampered cell from a bad key or a replay.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// A cell or onion whose shape is wrong: truncated, too long, an unknown field value.
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },

    /// The AEAD tag did not verify: the bytes were tampered with, truncated inside the
    /// ciphertext, delivered out of order, or sealed under another key.
    #[error("{what} failed authentication (tampered, reordered, or sealed under another key)")]
    Authentication { what: &'static str },

    /// A circuit set-up whose replay tag this relay has already seen.
    #[error("replayed circuit set-up: this relay already accepted a set-up with the same tag")]
    Replay,

    /// The replay cache is full of unexpired tags; refusing is safer than forgetting one.
    #[error("replay cache is full ({capacity} unexpired set-ups); refusing new circuits until tags expire")]
    ReplayCacheFull { capacity: usize },

    /// An Ed25519 signature that does not verify under the given public key.
    #[error("signature verification failed: {0}")]
    Signature(String),

    /// Key bytes or a key file that cannot be used: wrong length, not a curve point, a
    /// low-order X25519 point, bad PEM, unsafe file permissions.
    #[error("invalid key: {0}")]
    InvalidKey(String),

    /// A circuit (or hop) already poisoned by an earlier authentication failure.
    #[error("circuit is closed: an earlier cell failed authentication, so no further cells are accepted")]
    CircuitClosed,

    /// A caller-supplied argument outside the documented limits.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Reading or writing a key file failed.
    #[error("key file {path}: {detail}")]
    KeyFile { path: String, detail: String },
}

pub type Result<T> = std::result::Result<T, Error>;
