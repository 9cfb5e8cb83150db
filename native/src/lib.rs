//! swarmserve's native core. Everything that runs per token or per cell lives here: onion
//! layers, node identity signatures, the token-stream hash chain, ledger entry hashes and verifiable sampling. `python.rs` exposes it to
//! Python as the private module `swarmserve._native`.

pub mod chain;
pub mod error;
pub mod identity;
pub mod ledger;
pub mod onion;
pub mod sampling;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
