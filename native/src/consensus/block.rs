//! The ledger's block: a height, the parent's digest, the proposer's clock and a list of opaque
//! transactions (the ledger's state machine gives them meaning; consensus only orders them).
//!
//! Invariant: the encoding is canonical (one byte string per block: varints are minimal and
//! lengths are checked against [`BlockLimits`]), so a block's digest identifies it.

use bytes::{Buf as _, BufMut, Bytes};
use commonware_codec::{varint::UInt, Buf, EncodeSize, Error as CodecError, RangeCfg, Read, ReadExt, Write};
use commonware_consensus::{types::Height, Block as ConsensusBlock, Heightable};
use commonware_cryptography::{sha256::Digest, Digestible, Hasher, Sha256};

/// The largest genesis file: block 0 carries it whole, whatever the limits on transactions (no
/// peer can pass off another block 0: its digest is the chain's first).
pub const MAX_GENESIS_BYTES: usize = 16 << 20;

/// Bounds every node applies when it decodes a block from a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLimits {
    pub max_transactions: usize,
    pub max_transaction_bytes: usize,
}

impl Default for BlockLimits {
    fn default() -> Self {
        Self {
            max_transactions: 1024,
            max_transaction_bytes: 64 * 1024,
        }
    }
}

impl BlockLimits {
    /// The largest encoded block these limits admit (sizes the p2p messages).
    pub fn max_block_bytes(&self) -> usize {
        // parent + height + timestamp varints + count varint + per-transaction length varints.
        32 + 10 + 10 + 10 + self.max_transactions * (10 + self.max_transaction_bytes)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub parent: Digest,
    pub height: Height,
    /// The proposer's clock (milliseconds since the Unix epoch); strictly increasing along the chain.
    pub timestamp_ms: u64,
    pub transactions: Vec<Bytes>,
}

impl Block {
    /// Height 0: no parent, the genesis file as its only transaction, so nodes started from
    /// different genesis files never agree on anything.
    pub fn genesis(genesis: &[u8]) -> Self {
        Self {
            parent: Sha256::hash(&[b""]),
            height: Height::zero(),
            timestamp_ms: 0,
            transactions: vec![Bytes::copy_from_slice(genesis)],
        }
    }
}

impl Write for Block {
    fn write(&self, buf: &mut impl BufMut) {
        self.parent.write(buf);
        UInt(self.height.get()).write(buf);
        UInt(self.timestamp_ms).write(buf);
        UInt(self.transactions.len() as u64).write(buf);
        for transaction in &self.transactions {
            UInt(transaction.len() as u64).write(buf);
            buf.put_slice(transaction);
        }
    }
}

impl EncodeSize for Block {
    fn encode_size(&self) -> usize {
        self.parent.encode_size()
            + UInt(self.height.get()).encode_size()
            + UInt(self.timestamp_ms).encode_size()
            + UInt(self.transactions.len() as u64).encode_size()
            + self
                .transactions
                .iter()
                .map(|t| UInt(t.len() as u64).encode_size() + t.len())
                .sum::<usize>()
    }
}

impl Read for Block {
    type Cfg = BlockLimits;

    fn read_cfg(buf: &mut impl Buf, limits: &BlockLimits) -> Result<Self, CodecError> {
        let parent = Digest::read(buf)?;
        let height = Height::new(UInt::<u64>::read(buf)?.into());
        let timestamp_ms = UInt::<u64>::read(buf)?.into();
        let count: u64 = UInt::<u64>::read(buf)?.into();
        let count = usize::try_from(count).map_err(|_| CodecError::InvalidLength(usize::MAX))?;
        if !RangeCfg::from(0..=limits.max_transactions).contains(&count) {
            return Err(CodecError::InvalidLength(count));
        }
        let max_transaction_bytes = if height.get() == 0 {
            MAX_GENESIS_BYTES
        } else {
            limits.max_transaction_bytes
        };
        let mut transactions = Vec::with_capacity(count);
        for _ in 0..count {
            let length: u64 = UInt::<u64>::read(buf)?.into();
            let length = usize::try_from(length).map_err(|_| CodecError::InvalidLength(usize::MAX))?;
            if length > max_transaction_bytes {
                return Err(CodecError::InvalidLength(length));
            }
            if buf.remaining() < length {
                return Err(CodecError::EndOfBuffer);
            }
            transactions.push(buf.copy_to_bytes(length));
        }
        Ok(Self {
            parent,
            height,
            timestamp_ms,
            transactions,
        })
    }
}

impl Digestible for Block {
    type Digest = Digest;

    fn digest(&self) -> Digest {
        let mut encoded = Vec::with_capacity(self.encode_size());
        self.write(&mut encoded);
        Sha256::hash(&[&encoded])
    }
}

impl Heightable for Block {
    fn height(&self) -> Height {
        self.height
    }
}

impl ConsensusBlock for Block {
    fn parent(&self) -> Digest {
        self.parent
    }
}

/// Decodes one whole block (trailing bytes are an error).
pub fn decode_block(bytes: &[u8], limits: &BlockLimits) -> Result<Block, CodecError> {
    let mut buf = Bytes::copy_from_slice(bytes);
    let block = Block::read_cfg(&mut buf, limits)?;
    if buf.has_remaining() {
        return Err(CodecError::ExtraData(buf.remaining()));
    }
    Ok(block)
}

/// The block's canonical encoding.
pub fn encode_block(block: &Block) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(block.encode_size());
    block.write(&mut encoded);
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> Block {
        Block {
            parent: Sha256::hash(&[b"parent"]),
            height: Height::new(7),
            timestamp_ms: 1_700_000_000_000,
            transactions: vec![Bytes::from_static(b"pay"), Bytes::new(), Bytes::from(vec![9; 300])],
        }
    }

    #[test]
    fn round_trips_and_the_digest_covers_every_field() {
        let limits = BlockLimits::default();
        let original = block();
        let encoded = encode_block(&original);
        assert_eq!(encoded.len(), original.encode_size());
        assert_eq!(decode_block(&encoded, &limits).unwrap(), original);
        let mut other = original.clone();
        other.transactions[0] = Bytes::from_static(b"paz");
        assert_ne!(other.digest(), original.digest());
        other = original.clone();
        other.timestamp_ms += 1;
        assert_ne!(other.digest(), original.digest());
    }

    #[test]
    fn a_genesis_file_larger_than_a_transaction_fits_block_zero_only() {
        let limits = BlockLimits::default();
        let file = vec![b'x'; limits.max_transaction_bytes * 3];
        let genesis = Block::genesis(&file);
        assert_eq!(decode_block(&encode_block(&genesis), &limits).unwrap(), genesis);
        let mut later = genesis.clone();
        later.height = Height::new(1);
        assert!(decode_block(&encode_block(&later), &limits).is_err());
    }

    #[test]
    fn refuses_blocks_past_the_limits_and_malformed_bytes() {
        let encoded = encode_block(&block());
        let tight = BlockLimits {
            max_transactions: 2,
            max_transaction_bytes: 1024,
        };
        assert!(decode_block(&encoded, &tight).is_err());
        let small = BlockLimits {
            max_transactions: 16,
            max_transaction_bytes: 100,
        };
        assert!(decode_block(&encoded, &small).is_err());
        let limits = BlockLimits::default();
        assert!(decode_block(&encoded[..encoded.len() - 1], &limits).is_err());
        let mut trailing = encoded.clone();
        trailing.push(0);
        assert!(decode_block(&trailing, &limits).is_err());
        // A non-minimal varint for the height is another encoding of the same block: refused.
        let mut padded = encoded[..32].to_vec();
        padded.extend_from_slice(&[0x87, 0x00]);
        padded.extend_from_slice(&encoded[33..]);
        assert!(decode_block(&padded, &limits).is_err());
    }
}
