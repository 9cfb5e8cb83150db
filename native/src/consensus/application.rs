//! What a validator builds and accepts: blocks that carry pending transactions, paced to one per
//! `block_interval` (so an idle chain stays small), with strictly increasing timestamps.
//!
//! Consensus does not judge transactions (the ledger's state machine does, deterministically,
//! in block order), so a block is invalid only if its shape is: a timestamp not after its
//! parent's by at least the interval. A timestamp ahead of this validator's clock is not
//! refused (clocks drift): the vote waits until the clock has caught up, and the view times
//! out if that takes too long, which is how a leader with a runaway clock loses its slot.

use super::block::{Block, BlockLimits};
use super::mempool::{transaction_digest, Mempool};
use commonware_consensus::{marshal::ancestry::Ancestry, simplex::types::Context as ConsensusContext, Heightable};
use commonware_cryptography::{ed25519, sha256::Digest, Digested, Digestible};
use commonware_parallel::Sequential;
use commonware_runtime::{tokio, Clock};
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

pub type Scheme = commonware_consensus::simplex::scheme::ed25519::Scheme;
type Context = ConsensusContext<Digest, ed25519::PublicKey>;

/// How far back a proposer looks for transactions already in unfinalized ancestors.
const MAX_ANCESTRY_WALK: usize = 64;
/// A block's timestamp may be this far ahead of a voter's clock before the vote waits.
const MAX_CLOCK_SKEW: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Application {
    pub mempool: Mempool,
    pub limits: BlockLimits,
    pub block_interval: Duration,
    /// The height of the last block delivered to the ledger (shared with the delivery task).
    pub delivered: Arc<AtomicU64>,
}

fn now_ms(runtime: &impl Clock) -> u64 {
    runtime
        .current()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl commonware_consensus::Application<tokio::Context> for Application {
    type SigningScheme = Scheme;
    type Context = Context;
    type Block = Block;
    type Input = ();

    async fn propose(
        &mut self,
        (runtime, _context): (tokio::Context, Context),
        mut ancestry: impl Ancestry<Block>,
        _input: (),
    ) -> Option<Digested<Block>> {
        let parent = ancestry.next().await?;
        // Transactions already in an ancestor that is not final yet are not proposed again.
        let delivered = self.delivered.load(Ordering::Acquire);
        let mut exclude = HashSet::new();
        let mut ancestor = Some(parent.clone());
        for _ in 0..MAX_ANCESTRY_WALK {
            let Some(block) = ancestor else { break };
            if block.height().get() <= delivered {
                break;
            }
            exclude.extend(block.inner().transactions.iter().map(|t| transaction_digest(t)));
            ancestor = ancestry.next().await;
        }
        let interval = self.block_interval.as_millis() as u64;
        let earliest = parent.inner().timestamp_ms.saturating_add(interval.max(1));
        let now = now_ms(&runtime);
        if now < earliest {
            runtime.sleep(Duration::from_millis(earliest - now)).await;
        }
        let block = Block {
            parent: parent.digest(),
            height: parent.height().next(),
            timestamp_ms: now_ms(&runtime).max(earliest),
            transactions: self.mempool.batch(self.limits.max_transactions, &exclude),
        };
        Some(Digested::compute(block, &Sequential).await)
    }

    async fn verify(
        &mut self,
        (runtime, _context): (tokio::Context, Context),
        mut ancestry: impl Ancestry<Block>,
    ) -> bool {
        let (Some(block), Some(parent)) = (ancestry.next().await, ancestry.next().await) else {
            return false;
        };
        let interval = self.block_interval.as_millis() as u64;
        if block.inner().timestamp_ms < parent.inner().timestamp_ms.saturating_add(interval.max(1)) {
            return false;
        }
        let ahead = block.inner().timestamp_ms.saturating_sub(now_ms(&runtime));
        if ahead > MAX_CLOCK_SKEW.as_millis() as u64 {
            runtime.sleep(Duration::from_millis(ahead)).await;
        }
        true
    }
}
