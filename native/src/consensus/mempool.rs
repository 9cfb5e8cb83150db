//! Transactions waiting for a block, shared by the node's submit path, its gossip receiver and
//! its proposer.
//!
//! Invariants: at most `capacity` transactions and `max_bytes` bytes are held (a full pool
//! refuses, it never evicts, so a flood cannot push honest transactions out once they are in);
//! each transaction is held once (by digest); a transaction leaves when a finalized block
//! carries it. A transaction in a notarized block that is never finalized stays, so it is
//! proposed again. Consensus does not judge transactions: the ledger's state machine applies
//! or ignores each one deterministically, so a duplicate in two blocks costs only space.

use bytes::Bytes;
use commonware_cryptography::{sha256::Digest, Hasher, Sha256};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    TooLarge { bytes: usize, max: usize },
    Full,
}

#[derive(Default)]
struct Pool {
    order: VecDeque<(Digest, Bytes)>,
    held: HashSet<Digest>,
    bytes: usize,
}

#[derive(Clone)]
pub struct Mempool {
    pool: Arc<Mutex<Pool>>,
    capacity: usize,
    max_bytes: usize,
    max_transaction_bytes: usize,
}

impl Mempool {
    pub fn new(capacity: usize, max_bytes: usize, max_transaction_bytes: usize) -> Self {
        Self {
            pool: Arc::default(),
            capacity,
            max_bytes,
            max_transaction_bytes,
        }
    }

    /// Adds a transaction; `Ok(false)` if it was already held.
    pub fn add(&self, transaction: Bytes) -> Result<bool, Refusal> {
        if transaction.len() > self.max_transaction_bytes {
            return Err(Refusal::TooLarge {
                bytes: transaction.len(),
                max: self.max_transaction_bytes,
            });
        }
        let digest = Sha256::hash(&[&transaction]);
        let mut pool = self.pool.lock().expect("mempool lock");
        if pool.held.contains(&digest) {
            return Ok(false);
        }
        if pool.order.len() >= self.capacity || pool.bytes + transaction.len() > self.max_bytes {
            return Err(Refusal::Full);
        }
        pool.bytes += transaction.len();
        pool.held.insert(digest);
        pool.order.push_back((digest, transaction));
        Ok(true)
    }

    /// The oldest transactions not in `exclude` (already in an unfinalized ancestor), within
    /// the block's limits.
    pub fn batch(&self, max_transactions: usize, exclude: &HashSet<Digest>) -> Vec<Bytes> {
        let pool = self.pool.lock().expect("mempool lock");
        pool.order
            .iter()
            .filter(|(digest, _)| !exclude.contains(digest))
            .take(max_transactions)
            .map(|(_, transaction)| transaction.clone())
            .collect()
    }

    /// Forgets the transactions a finalized block carried.
    pub fn finalized(&self, transactions: &[Bytes]) {
        let gone: HashSet<Digest> = transactions.iter().map(|t| Sha256::hash(&[t])).collect();
        let mut pool = self.pool.lock().expect("mempool lock");
        if !pool.order.iter().any(|(digest, _)| gone.contains(digest)) {
            return;
        }
        let mut kept = VecDeque::with_capacity(pool.order.len());
        let mut bytes = 0;
        for (digest, transaction) in pool.order.drain(..) {
            if gone.contains(&digest) {
                continue;
            }
            bytes += transaction.len();
            kept.push_back((digest, transaction));
        }
        pool.held = kept.iter().map(|(digest, _)| *digest).collect();
        pool.order = kept;
        pool.bytes = bytes;
    }

    pub fn len(&self) -> usize {
        self.pool.lock().expect("mempool lock").order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The digest the pool keys a transaction by.
pub fn transaction_digest(transaction: &[u8]) -> Digest {
    Sha256::hash(&[transaction])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_each_transaction_once_in_order_and_forgets_finalized_ones() {
        let pool = Mempool::new(8, 1 << 20, 1024);
        for t in [b"a", b"b", b"c"] {
            assert_eq!(pool.add(Bytes::from_static(t)), Ok(true));
        }
        assert_eq!(pool.add(Bytes::from_static(b"b")), Ok(false));
        let exclude: HashSet<_> = [transaction_digest(b"a")].into();
        assert_eq!(
            pool.batch(8, &exclude),
            vec![Bytes::from_static(b"b"), Bytes::from_static(b"c")]
        );
        assert_eq!(pool.batch(1, &HashSet::new()), vec![Bytes::from_static(b"a")]);
        pool.finalized(&[Bytes::from_static(b"a"), Bytes::from_static(b"z")]);
        assert_eq!(pool.len(), 2);
        assert_eq!(pool.add(Bytes::from_static(b"a")), Ok(true)); // may come back: the state machine ignores replays
    }

    #[test]
    fn a_full_pool_refuses_and_never_evicts() {
        let pool = Mempool::new(2, 10, 8);
        assert_eq!(
            pool.add(Bytes::from_static(b"123456789")),
            Err(Refusal::TooLarge { bytes: 9, max: 8 })
        );
        assert_eq!(pool.add(Bytes::from_static(b"12345678")), Ok(true));
        assert_eq!(pool.add(Bytes::from_static(b"abc")), Err(Refusal::Full)); // 11 bytes > 10
        assert_eq!(pool.add(Bytes::from_static(b"ab")), Ok(true));
        assert_eq!(pool.add(Bytes::from_static(b"x")), Err(Refusal::Full)); // 2 transactions held
        assert_eq!(pool.batch(8, &HashSet::new())[0], Bytes::from_static(b"12345678"));
    }
}
