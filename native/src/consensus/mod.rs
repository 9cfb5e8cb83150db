//! The ledger's consensus: a chain of blocks of opaque transactions, ordered by Commonware's
//! simplex BFT consensus among a committee of validators (safe while fewer than a third are
//! Byzantine), disseminated and stored by Commonware's marshal, over Commonware's authenticated
//! p2p. The ledger's state machine (in Python) gives the transactions meaning and applies them
//! in block order; this module never interprets them.
//!
//! - [`block`]: the block and its canonical encoding;
//! - [`mempool`]: transactions waiting for a block;
//! - [`application`]: what a validator proposes and votes for;
//! - [`node`]: a validator, wired and running on its own thread;
//! - [`proofs`]: finalization certificates and equivocation evidence, checked from bytes.

pub mod application;
pub mod block;
pub mod mempool;
pub mod node;
pub mod proofs;

/// Domain separation: signatures made for this chain are valid for nothing else.
pub const CONSENSUS_NAMESPACE: &[u8] = b"swarmserve-ledger-v1-consensus";
pub const P2P_NAMESPACE: &[u8] = b"swarmserve-ledger-v1-p2p";
