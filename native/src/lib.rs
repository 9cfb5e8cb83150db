//! swarmserve's native core. Everything that runs per token or per cell lives here: onion
//! layers, node identity signatures, the token-stream hash chain and
//! verifiable sampling; so does the ledger's consensus node (`consensus`), which runs per block.
//! `python.rs` and `python_consensus.rs` expose it to Python as the private module
//! `swarmserve._native`.

pub mod chain;
pub mod consensus;
pub mod error;
pub mod identity;
pub mod link;
pub mod onion;
pub mod sampling;
pub mod sida;
pub mod tokens;

#[cfg(feature = "python")]
mod python;
#[cfg(feature = "python")]
mod python_consensus;

pub use error::{Error, Result};
