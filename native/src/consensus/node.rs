//! A validator of the ledger's chain: Commonware's simplex consensus among the committee of each
//! epoch, marshal for block dissemination, backfill, durable storage and in-order delivery, and
//! Commonware's authenticated p2p (each peer proves its ed25519 identity key; messages are
//! encrypted, rate-limited per channel and peer, and bounded in size and queue length).
//!
//! Epochs: the chain is cut into epochs of `epoch_length` blocks, and each epoch has its own
//! committee and its own simplex engine, whose votes travel on that epoch's subchannel. The
//! ledger decides the committees (from stake, in block order: see `swarmserve/chain/committee.py`)
//! and tells the node: [`Node::add_committee`] once it has applied the last block of the epoch
//! before, then [`Node::enter_epoch`], which stops the old engine and, if this node is in the new
//! committee, starts a new one whose genesis is that last block. Every committee the node was
//! given stays known, so marshal can check the certificates of any epoch it backfills. A message
//! from a later epoch than the node's means it is behind: marshal is asked for the certified last
//! block of the node's epoch, from the sender.
//!
//! The node runs on its own thread with its own runtime and storage directory. The ledger
//! talks to it through [`Node`]: it submits transactions, receives finalized blocks in height
//! order with their finalization certificates, and acknowledges each block once its effects are
//! durable; an unacknowledged block is delivered again after a restart, so the ledger's state is
//! never ahead of the chain it was derived from. Conflicting votes (a validator signing two
//! proposals in one view, or nullifying and finalizing one) come out as verified evidence.

use super::application::{Application, Scheme};
use super::block::{encode_block, Block, BlockLimits};
use super::mempool::{Mempool, Refusal};
use super::{CONSENSUS_NAMESPACE, P2P_NAMESPACE};
use bytes::Bytes;
use commonware_broadcast::buffered;
use commonware_codec::{Copying, DecodeExt, Encode};
use commonware_consensus::{
    marshal::{
        self,
        core::{Actor as Marshal, Mailbox as MarshalMailbox},
        resolver::p2p as backfill,
        standard::{Inline, Standard},
        Start, Update,
    },
    simplex::{
        self,
        elector::RoundRobin,
        scheme::reporter::AttributableReporter,
        types::{Activity, Attributable as _, Notarize, Proposal, Vote},
        ForwardPolicy, SkipPolicy,
    },
    types::{Epoch, Epocher as _, FixedEpocher, ViewDelta},
    Heightable, Reporter, Reporters,
};
use commonware_cryptography::{
    certificate::{Provider, Scheme as _, Scoped, Verifier as _},
    ed25519,
    sha256::Digest,
    ChaCha20Poly1305, Digested, Digestible, Sha256, Signer,
};
use commonware_p2p::{
    authenticated::lookup,
    utils::mux::{Builder as _, Muxer},
    Address, AddressableManager, AddressableTrackedPeers, Receiver as _, Recipients, Sender as _,
};
use commonware_parallel::Sequential;
use commonware_runtime::{buffer::paged::CacheRef, tokio, Quota, Runner as _, Spawner, Storage as _, Supervisor as _};
use commonware_storage::archive::immutable;
use commonware_stream::{
    cups::{self, Cups},
    sake::{self, Sake},
};
use commonware_utils::{
    acknowledgement::Exact,
    ordered::{Map, Quorum as _, Set},
    vec::NonEmptyVec,
    Acknowledgement, NZDuration, NZUsize, Participant, NZU16, NZU32, NZU64,
};
use futures::{channel::mpsc, StreamExt};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// p2p channels: simplex's three, marshal's two, and transaction gossip.
const VOTES: u64 = 0;
const CERTIFICATES: u64 = 1;
const RESOLVER: u64 = 2;
const BLOCKS: u64 = 3;
const BACKFILL: u64 = 4;
const TRANSACTIONS: u64 = 5;
/// The epoch length of a chain whose committee never changes.
pub const ONE_EPOCH: u64 = u64::MAX / 2;

/// A committee: every validator's public key and consensus address.
pub type Committee = Vec<([u8; 32], SocketAddr)>;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The node's ed25519 identity seed (its identity key file's secret).
    pub seed: [u8; 32],
    pub storage_directory: PathBuf,
    pub listen: SocketAddr,
    /// The epoch the node starts in, and the committee of every epoch up to it that the ledger
    /// knows (the starting epoch's included), so marshal can check certificates of any of them.
    pub epoch: u64,
    pub committees: BTreeMap<u64, Committee>,
    /// Blocks per epoch ([`ONE_EPOCH`]: the genesis committee forever).
    pub epoch_length: u64,
    /// The digest of the last block of the epoch before the starting one (the starting epoch's
    /// genesis); None for epoch 0, whose genesis is the chain's.
    pub floor: Option<[u8; 32]>,
    /// The most validators a committee may have (bounds the p2p peer sets).
    pub max_committee: usize,
    /// The genesis file's bytes: the chain's first block carries them.
    pub genesis: Vec<u8>,
    /// Adversarial tests only: sign a conflicting notarize vote for every vote cast.
    pub equivocate: bool,
    pub limits: BlockLimits,
    pub block_interval: Duration,
    pub leader_timeout: Duration,
    pub mempool_transactions: usize,
    pub mempool_bytes: usize,
}

#[derive(Clone, Debug)]
pub struct FinalizedBlock {
    pub height: u64,
    pub digest: [u8; 32],
    pub block: Block,
    pub encoded: Vec<u8>,
    /// The finalization certificate, where this height was finalized directly (a height
    /// finalized through a descendant is proven by that descendant's certificate).
    pub certificate: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("the consensus node stopped: {0}")]
    Stopped(String),
    #[error("transaction of {bytes} bytes refused: at most {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("the transaction pool is full; try again later")]
    Full,
}

pub struct Node {
    public_key: [u8; 32],
    mempool: Mempool,
    gossip: flume::Sender<Bytes>,
    finalized: flume::Receiver<FinalizedBlock>,
    acknowledged: flume::Sender<u64>,
    evidence: flume::Receiver<Vec<u8>>,
    control: flume::Sender<Control>,
    epoch: Arc<AtomicU64>,
    max_committee: usize,
    stop: Option<flume::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What the ledger tells the orchestrator at epoch boundaries.
enum Control {
    Committee {
        epoch: u64,
        participants: Set<ed25519::PublicKey>,
        addresses: Map<ed25519::PublicKey, Address>,
    },
    Enter {
        epoch: u64,
        floor: Digest,
    },
}

fn key(bytes: &[u8]) -> Result<ed25519::PublicKey, NodeError> {
    ed25519::PublicKey::decode(Copying(bytes)).map_err(|e| NodeError::Config(format!("bad validator key: {e}")))
}

fn digest(bytes: &[u8; 32]) -> Digest {
    Digest::decode(Copying(&bytes[..])).expect("32 bytes")
}

/// A committee's keys (as the signing scheme takes them) and addresses (as p2p does).
fn committee(validators: &Committee, max: usize) -> Result<Members, NodeError> {
    if validators.is_empty() || validators.len() > max {
        return Err(NodeError::Config(format!(
            "a committee has 1 to {max} validators, not {}",
            validators.len()
        )));
    }
    let mut participants = Vec::with_capacity(validators.len());
    let mut addresses = Vec::with_capacity(validators.len());
    for (validator, address) in validators {
        let validator = key(validator)?;
        participants.push(validator.clone());
        addresses.push((validator, Address::Symmetric(*address)));
    }
    let participants =
        Set::try_from(participants).map_err(|_| NodeError::Config("a validator is listed twice".into()))?;
    let addresses = Map::try_from(addresses).map_err(|_| NodeError::Config("a validator is listed twice".into()))?;
    Ok((participants, addresses))
}

/// Every epoch's signing scheme, as marshal and the engines ask for it: a signing scheme where
/// this node is in the committee, a verifier elsewhere.
#[derive(Clone)]
struct Committees {
    signer: ed25519::PrivateKey,
    schemes: Arc<Mutex<BTreeMap<Epoch, Scoped<Scheme>>>>,
}

impl Committees {
    fn insert(&self, epoch: u64, participants: Set<ed25519::PublicKey>) {
        let scoped = match Scheme::signer(CONSENSUS_NAMESPACE, participants.clone(), self.signer.clone()) {
            Some(scheme) => Scoped::scheme(Arc::new(scheme)),
            None => Scoped::verifier(Arc::new(Scheme::verifier(CONSENSUS_NAMESPACE, participants))),
        };
        self.schemes
            .lock()
            .expect("committees lock")
            .insert(Epoch::new(epoch), scoped);
    }
}

impl Provider for Committees {
    type Scope = Epoch;
    type Scheme = Scheme;

    fn scoped(&self, epoch: Epoch) -> Option<Scoped<Scheme>> {
        self.schemes.lock().expect("committees lock").get(&epoch).cloned()
    }
}

impl Node {
    /// Starts the node; returns once its network listens (or with the error that stopped it).
    pub fn start(config: NodeConfig) -> Result<Self, NodeError> {
        let signer = ed25519::PrivateKey::decode(Copying(&config.seed[..]))
            .map_err(|e| NodeError::Config(format!("bad identity seed: {e}")))?;
        let public_key: [u8; 32] = signer
            .public_key()
            .encode()
            .as_ref()
            .try_into()
            .map_err(|_| NodeError::Config("public key is not 32 bytes".into()))?;
        if config.epoch_length < 2 {
            return Err(NodeError::Config("an epoch has at least 2 blocks".into()));
        }
        if config.epoch > 0 && config.floor.is_none() {
            return Err(NodeError::Config(
                "a node starting after epoch 0 needs its epoch's floor".into(),
            ));
        }
        let mut committees = BTreeMap::new();
        for (epoch, validators) in &config.committees {
            committees.insert(*epoch, committee(validators, config.max_committee)?);
        }
        if !committees.contains_key(&config.epoch) {
            return Err(NodeError::Config(format!(
                "no committee for the starting epoch {}",
                config.epoch
            )));
        }

        let mempool = Mempool::new(
            config.mempool_transactions,
            config.mempool_bytes,
            config.limits.max_transaction_bytes,
        );
        let (gossip, gossip_out) = flume::bounded(4096);
        let (finalized_in, finalized) = flume::bounded(256);
        let (acknowledged, acknowledged_out) = flume::unbounded();
        let (evidence_in, evidence) = flume::bounded(1024);
        let (stop, stopped) = flume::bounded(1);
        let (ready_in, ready) = flume::bounded(1);
        let (control, control_out) = flume::unbounded();
        let max_committee = config.max_committee;
        let epoch = Arc::new(AtomicU64::new(config.epoch));
        let channels = Channels {
            mempool: mempool.clone(),
            gossip: gossip_out,
            finalized: finalized_in,
            acknowledged: acknowledged_out,
            evidence: evidence_in,
            control: control_out,
            epoch: epoch.clone(),
            stop: stopped,
            ready: ready_in,
        };
        let thread = std::thread::Builder::new()
            .name("consensus".into())
            .spawn(move || run(config, signer, committees, channels))
            .map_err(|e| NodeError::Stopped(e.to_string()))?;
        let mut node = Self {
            public_key,
            mempool,
            gossip,
            finalized,
            acknowledged,
            evidence,
            control,
            epoch,
            max_committee,
            stop: Some(stop),
            thread: Some(thread),
        };
        match ready.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => Ok(node),
            Err(_) => Err(NodeError::Stopped(node.join())),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// Queues a transaction for a block and passes it to the other validators; `Ok(false)` if
    /// it was already queued.
    pub fn submit(&self, transaction: Bytes) -> Result<bool, NodeError> {
        self.check_running()?;
        match self.mempool.add(transaction.clone()) {
            Ok(true) => {
                let _ = self.gossip.try_send(transaction); // gossip is best effort: the pool holds it
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(Refusal::TooLarge { bytes, max }) => Err(NodeError::TooLarge { bytes, max }),
            Err(Refusal::Full) => Err(NodeError::Full),
        }
    }

    /// Makes `validators` the committee of `epoch` (known from then on: marshal checks that
    /// epoch's certificates with it). Call it once the last block of the epoch before is applied.
    pub fn add_committee(&self, epoch: u64, validators: &Committee) -> Result<(), NodeError> {
        let (participants, addresses) = committee(validators, self.max_committee)?;
        self.check_running()?;
        self.control
            .send(Control::Committee {
                epoch,
                participants,
                addresses,
            })
            .map_err(|_| NodeError::Stopped("the node's thread ended".into()))
    }

    /// Moves to `epoch` (its committee added before), whose genesis is `floor`, the digest of
    /// the last block of the epoch before: the old epoch's engine stops, and a new one starts if
    /// this node is in the new committee. An epoch not after the current one is ignored.
    pub fn enter_epoch(&self, epoch: u64, floor: [u8; 32]) -> Result<(), NodeError> {
        self.check_running()?;
        self.control
            .send(Control::Enter {
                epoch,
                floor: digest(&floor),
            })
            .map_err(|_| NodeError::Stopped("the node's thread ended".into()))
    }

    /// The epoch whose engine runs (or would, if this node were in its committee).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The next finalized block in height order, or None after `timeout`.
    pub fn next_finalized(&self, timeout: Duration) -> Result<Option<FinalizedBlock>, NodeError> {
        self.check_running()?; // a stopped node delivers nothing more: it could not take the acknowledgement
        match self.finalized.recv_timeout(timeout) {
            Ok(block) => Ok(Some(block)),
            Err(flume::RecvTimeoutError::Timeout) => {
                self.check_running()?;
                Ok(None)
            }
            Err(flume::RecvTimeoutError::Disconnected) => Err(NodeError::Stopped("the node's thread ended".into())),
        }
    }

    /// The ledger has durably applied every block up to `height`.
    pub fn acknowledge(&self, height: u64) {
        let _ = self.acknowledged.send(height);
    }

    /// Verified evidence of a validator's conflicting votes (an encoded simplex `Activity`).
    pub fn next_evidence(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.evidence.recv_timeout(timeout).ok()
    }

    pub fn pending_transactions(&self) -> usize {
        self.mempool.len()
    }

    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn check_running(&self) -> Result<(), NodeError> {
        if self.is_running() {
            Ok(())
        } else {
            Err(NodeError::Stopped("the node's thread ended".into()))
        }
    }

    fn join(&mut self) -> String {
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(panic)) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "it panicked".into()),
            _ => "it ended".into(),
        }
    }

    /// Stops the node and waits for its thread (its storage is consistent on disk either way).
    pub fn stop(&mut self) -> Result<(), NodeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(_)) => Err(NodeError::Stopped("the node's thread panicked".into())),
            _ => Ok(()),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

struct Channels {
    mempool: Mempool,
    gossip: flume::Receiver<Bytes>,
    finalized: flume::Sender<FinalizedBlock>,
    acknowledged: flume::Receiver<u64>,
    evidence: flume::Sender<Vec<u8>>,
    control: flume::Receiver<Control>,
    epoch: Arc<AtomicU64>,
    stop: flume::Receiver<()>,
    ready: flume::Sender<()>,
}

/// marshal's reporter: finalized blocks, into the delivery task.
#[derive(Clone)]
struct Delivery(mpsc::UnboundedSender<Update<Block>>);

impl Reporter for Delivery {
    type Activity = Update<Block>;

    fn report(&mut self, update: Update<Block>) -> commonware_actor::Feedback {
        if self.0.unbounded_send(update).is_ok() {
            commonware_actor::Feedback::Ok
        } else {
            commonware_actor::Feedback::Closed
        }
    }
}

/// simplex's reporter for faults (already verified by [`AttributableReporter`]); for an
/// equivocating node (adversarial tests only), also the place where it betrays its votes.
#[derive(Clone)]
struct Evidence<S> {
    faults: flume::Sender<Vec<u8>>,
    equivocate: Option<Equivocate<S>>,
}

/// For every notarize vote this node casts, it also signs one for another block in the same
/// view and sends it to every validator: what a Byzantine validator trying to fork does.
#[derive(Clone)]
struct Equivocate<S> {
    scheme: Scheme,
    me: Participant,
    votes: S,
}

impl<S: commonware_p2p::Sender<PublicKey = ed25519::PublicKey>> Reporter for Evidence<S> {
    type Activity = Activity<Scheme, Digest>;

    fn report(&mut self, activity: Activity<Scheme, Digest>) -> commonware_actor::Feedback {
        match &activity {
            Activity::ConflictingNotarize(_) | Activity::ConflictingFinalize(_) | Activity::NullifyFinalize(_) => {
                let _ = self.faults.try_send(activity.encode().to_vec());
            }
            Activity::Notarize(vote) => {
                if let Some(liar) = &mut self.equivocate {
                    if vote.signer() == liar.me {
                        let mut other: [u8; 32] = vote.proposal.payload.as_ref().try_into().expect("sha256");
                        other[0] ^= 0xff;
                        let proposal = Proposal::new(vote.proposal.round, vote.proposal.parent, digest(&other));
                        if let Some(conflict) = Notarize::sign(&liar.scheme, proposal) {
                            let encoded = Vote::<Scheme, Digest>::Notarize(conflict).encode();
                            let _ = liar.votes.send(Recipients::All, encoded, true);
                        }
                    }
                }
            }
            _ => {}
        }
        commonware_actor::Feedback::Ok
    }
}

fn archive_config<C: Clone>(prefix: &str, name: &str, page_cache: &CacheRef, codec_config: C) -> immutable::Config<C> {
    immutable::Config {
        metadata_partition: format!("{prefix}-{name}-metadata"),
        freezer_table_partition: format!("{prefix}-{name}-freezer-table"),
        freezer_table_initial_size: 64,
        freezer_table_resize_frequency: 10,
        freezer_table_resize_chunk_size: 10,
        freezer_key_partition: format!("{prefix}-{name}-freezer-key"),
        freezer_key_page_cache: page_cache.clone(),
        freezer_value_partition: format!("{prefix}-{name}-freezer-value"),
        freezer_value_target_size: 1 << 20,
        freezer_value_compression: None,
        ordinal_partition: format!("{prefix}-{name}-ordinal"),
        items_per_section: NZU64!(1024),
        codec_config,
        replay_buffer: NZUsize!(1 << 20),
        freezer_key_write_buffer: NZUsize!(1 << 20),
        freezer_value_write_buffer: NZUsize!(1 << 20),
        ordinal_write_buffer: NZUsize!(1 << 20),
    }
}

/// A committee as the signing scheme (keys) and p2p (addresses) take it.
type Members = (Set<ed25519::PublicKey>, Map<ed25519::PublicKey, Address>);

fn run(config: NodeConfig, signer: ed25519::PrivateKey, committees: BTreeMap<u64, Members>, channels: Channels) {
    let runtime = tokio::Config::new()
        .with_storage_directory(config.storage_directory.clone())
        .with_worker_threads(2);
    tokio::Runner::new(runtime).start(|context| async move {
        let me = signer.public_key();
        let limits = config.limits;
        let provider = Committees {
            signer: signer.clone(),
            schemes: Arc::default(),
        };
        for (epoch, (participants, _)) in &committees {
            provider.insert(*epoch, participants.clone());
        }

        // --- authenticated p2p among the committee ---
        let handshake = Cups::<_, ChaCha20Poly1305>::new(
            Sake {
                signer: signer.clone(),
                synchrony_bound: Duration::from_secs(5),
                max_handshake_age: Duration::from_secs(10),
                version: sake::Version::V1,
            },
            cups::Version::V1,
        );
        let max_message = u32::try_from(limits.max_block_bytes() + (64 << 10)).unwrap_or(u32::MAX);
        let p2p = lookup::Config::local(
            handshake,
            P2P_NAMESPACE,
            config.listen,
            NZUsize!(config.max_committee + 1),
            max_message,
            NZUsize!(1024),
        );
        let (mut network, mut oracle) = lookup::Network::new(context.child("p2p"), p2p);
        let (_, addresses) = &committees[&config.epoch];
        let _ = oracle.track(
            config.epoch,
            AddressableTrackedPeers::new(addresses.clone(), Map::default()),
        );
        let consensus_rate = Quota::per_second(NZU32!(256));
        let (vote_sender, vote_receiver) = network.register(VOTES, consensus_rate);
        let (certificate_sender, certificate_receiver) = network.register(CERTIFICATES, consensus_rate);
        let (resolver_sender, resolver_receiver) = network.register(RESOLVER, consensus_rate);
        let blocks = network.register(BLOCKS, Quota::per_second(NZU32!(64)));
        let backfill_channel = network.register(BACKFILL, Quota::per_second(NZU32!(128)));
        let (mut gossip_sender, mut gossip_receiver) = network.register(TRANSACTIONS, Quota::per_second(NZU32!(512)));
        network.start();
        // Each epoch's engine has its own subchannels; a message for an epoch without one lands
        // in the backup receiver.
        let (mux, mut votes, vote_backup) = Muxer::builder(context.child("vote_mux"), vote_sender, vote_receiver)
            .with_backup()
            .build();
        mux.start();
        let (mux, mut certificates, certificate_backup) = Muxer::builder(
            context.child("certificate_mux"),
            certificate_sender,
            certificate_receiver,
        )
        .with_backup()
        .build();
        mux.start();
        let (mux, mut resolvers) = Muxer::new(context.child("resolver_mux"), resolver_sender, resolver_receiver);
        mux.start();

        // --- durable stores and marshal ---
        let page_cache = CacheRef::new(NZU16!(4096), NZUsize!(4096));
        let finalizations = immutable::Archive::init(
            context.child("finalizations"),
            archive_config(
                "ledger",
                "finalizations",
                &page_cache,
                Scheme::certificate_codec_config_unbounded(),
            ),
        )
        .await
        .expect("cannot open the finalizations archive");
        let finalized_blocks = immutable::Archive::init(
            context.child("blocks"),
            archive_config("ledger", "blocks", &page_cache, limits),
        )
        .await
        .expect("cannot open the blocks archive");
        let genesis = Block::genesis(&config.genesis);
        let genesis_digest = genesis.digest();
        let epocher = FixedEpocher::new(NZU64!(config.epoch_length));
        let (marshal, mailbox, _floor): (_, MarshalMailbox<Scheme, Standard<Block>>, _) =
            Marshal::<_, Standard<Block>, _, _, _, _, _, Exact>::init(
                context.child("marshal"),
                finalizations,
                finalized_blocks,
                marshal::Config {
                    provider: provider.clone(),
                    epocher: epocher.clone(),
                    start: Start::Genesis(Digested::precomputed(genesis, genesis_digest)),
                    partition_prefix: "ledger".into(),
                    mailbox_size: NZUsize!(1024),
                    view_retention: ViewDelta::new(1024),
                    prunable_items_per_section: NZU64!(4096),
                    page_cache: page_cache.clone(),
                    replay_buffer: NZUsize!(1 << 20),
                    key_write_buffer: NZUsize!(1 << 20),
                    value_write_buffer: NZUsize!(1 << 20),
                    block_codec_config: limits,
                    max_repair: NZUsize!(64),
                    max_pending_acks: NZUsize!(64),
                    strategy: Sequential,
                },
            )
            .await;
        let (broadcast, buffer) = buffered::Engine::new(
            context.child("broadcast"),
            buffered::Config {
                public_key: me.clone(),
                mailbox_size: NZUsize!(1024),
                deque_size: 16,
                priority: false,
                codec_config: limits,
                peer_provider: oracle.clone(),
                strategy: Sequential,
            },
        );
        broadcast.start(blocks);
        let backfiller = backfill::init(
            context.child("backfill"),
            backfill::Config {
                public_key: me.clone(),
                peer_provider: oracle.clone(),
                blocker: oracle.clone(),
                mailbox_size: NZUsize!(1024),
                fetch_timeout: NZDuration!(Duration::from_secs(2)),
                fetch_retry_delay: Duration::from_millis(100),
                priority_requests: false,
                priority_responses: false,
            },
            backfill_channel,
        );
        let (delivered_in, mut delivered) = mpsc::unbounded();
        marshal.start(Delivery(delivered_in), buffer, backfiller);

        // --- consensus, one engine per epoch ---
        let height = Arc::new(AtomicU64::new(0));
        let application = Application {
            mempool: channels.mempool.clone(),
            limits,
            block_interval: config.block_interval,
            delivered: height.clone(),
        };
        let inline = Inline::new(context.child("inline"), application, mailbox.clone(), epocher.clone());
        let current = channels.epoch.clone();
        let evidence = channels.evidence.clone();
        let control = channels.control.clone();
        let leader_timeout = config.leader_timeout;
        let equivocate = config.equivocate;
        let me = me.clone();
        let start_floor = config.floor.map(|f| digest(&f)).unwrap_or(genesis_digest);
        let mut tracker = oracle.clone();
        let blocker = oracle.clone();
        let engines = provider.clone();
        context.child("orchestrator").spawn(move |context| async move {
            let mut epoch = current.load(Ordering::Acquire);
            let mut floor = start_floor;
            loop {
                // This epoch's engine, if this node is in its committee.
                let engine = match engines.scheme(Epoch::new(epoch)) {
                    None => None,
                    Some(scheme) => {
                        let scheme = scheme.as_ref().clone();
                        let (Ok(vote), Ok(certificate), Ok(resolver)) = (
                            votes.register(epoch).await,
                            certificates.register(epoch).await,
                            resolvers.register(epoch).await,
                        ) else {
                            return; // the muxers stopped: the node is stopping
                        };
                        let equivocate = equivocate.then(|| Equivocate {
                            scheme: scheme.clone(),
                            me: scheme.participants().index(&me).expect("a member signs"),
                            votes: vote.0.clone(),
                        });
                        let reporter = Reporters::from((
                            inline.clone(),
                            AttributableReporter::new(
                                context.child("evidence"),
                                scheme.clone(),
                                Evidence {
                                    faults: evidence.clone(),
                                    equivocate,
                                },
                                Sequential,
                                true,
                            ),
                        ));
                        let engine = simplex::Engine::new(
                            context.child("simplex"),
                            simplex::Config {
                                scheme,
                                elector: RoundRobin::<Sha256>::default(),
                                blocker: blocker.clone(),
                                automaton: inline.clone(),
                                relay: inline.clone(),
                                reporter,
                                track_historical_votes: true,
                                strategy: Sequential,
                                partition: format!("ledger-consensus-{epoch}"),
                                mailbox_size: NZUsize!(1024),
                                epoch: Epoch::new(epoch),
                                floor: simplex::Floor::Genesis(floor),
                                replay_buffer: NZUsize!(1 << 20),
                                write_buffer: NZUsize!(1 << 20),
                                page_cache: page_cache.clone(),
                                leader_timeout,
                                certification_timeout: leader_timeout * 2,
                                timeout_retry: leader_timeout * 5,
                                view_retention: ViewDelta::new(256),
                                skip: SkipPolicy::Disabled,
                                fetch_timeout: NZDuration!(Duration::from_secs(1)),
                                fetch_retry_delay: Duration::from_millis(100),
                                forward: ForwardPolicy::Disabled,
                            },
                        );
                        Some(engine.start(vote, certificate, resolver))
                    }
                };
                // Until the ledger moves the node to a later epoch.
                loop {
                    let Ok(message) = control.recv_async().await else {
                        return;
                    };
                    match message {
                        Control::Committee {
                            epoch: next,
                            participants,
                            addresses,
                        } => {
                            engines.insert(next, participants);
                            let _ = tracker.track(next, AddressableTrackedPeers::new(addresses, Map::default()));
                        }
                        Control::Enter {
                            epoch: next,
                            floor: genesis,
                        } if next > epoch => {
                            if let Some(engine) = &engine {
                                engine.abort();
                            }
                            // Two epochs back, nothing can need the journal any more.
                            if let Some(old) = next.checked_sub(2) {
                                let _ = context.remove(&format!("ledger-consensus-{old}"), None).await;
                            }
                            epoch = next;
                            floor = genesis;
                            current.store(epoch, Ordering::Release);
                            break;
                        }
                        Control::Enter { .. } => {}
                    }
                }
            }
        });
        // Messages for an epoch after this node's: it is behind; marshal fetches the certified
        // last block of its epoch from the sender, and the ledger moves it on from there.
        for (name, mut backup) in [("vote_backup", vote_backup), ("certificate_backup", certificate_backup)] {
            let current = channels.epoch.clone();
            let mailbox = mailbox.clone();
            let epocher = epocher.clone();
            context.child(name).spawn(move |_| async move {
                while let Some((their_epoch, (from, _))) = backup.recv().await {
                    let ours = Epoch::new(current.load(Ordering::Acquire));
                    if Epoch::new(their_epoch) <= ours {
                        continue;
                    }
                    if let Some(last) = epocher.last(ours) {
                        mailbox.hint_finalized(last, NonEmptyVec::new(from));
                    }
                }
            });
        }

        // --- transactions from the other validators ---
        let mempool = channels.mempool.clone();
        context.child("gossip_in").spawn(move |_| async move {
            while let Ok((_, message)) = gossip_receiver.recv().await {
                let _ = mempool.add(Bytes::copy_from_slice(message.as_ref()));
            }
        });
        let outgoing = channels.gossip.clone();
        context.child("gossip_out").spawn(move |_| async move {
            while let Ok(transaction) = outgoing.recv_async().await {
                let _ = gossip_sender.send(Recipients::All, transaction.to_vec(), false);
            }
        });

        // --- acknowledgements from the ledger ---
        let pending: Arc<Mutex<BTreeMap<u64, Exact>>> = Arc::default();
        let waiting = pending.clone();
        let acknowledged = channels.acknowledged.clone();
        context.child("acknowledgements").spawn(move |_| async move {
            while let Ok(height) = acknowledged.recv_async().await {
                let done: Vec<Exact> = {
                    let mut waiting = waiting.lock().expect("acks lock");
                    let later = waiting.split_off(&(height + 1));
                    std::mem::replace(&mut *waiting, later).into_values().collect()
                };
                for ack in done {
                    ack.acknowledge();
                }
            }
        });

        // --- finalized blocks, to the ledger ---
        let finalized = channels.finalized.clone();
        context.child("delivery").spawn(move |_| async move {
            while let Some(update) = delivered.next().await {
                let Update::Block(block, ack) = update else { continue };
                let block_height = block.height().get();
                let certificate = mailbox
                    .get_finalization(block.height())
                    .await
                    .map(|f| f.encode().to_vec());
                channels.mempool.finalized(&block.inner().transactions);
                height.store(block_height, Ordering::Release);
                if let Some(earlier) = pending.lock().expect("acks lock").insert(block_height, ack) {
                    earlier.acknowledge(); // delivered again before the ledger answered: one answer covers both
                }
                let delivered = FinalizedBlock {
                    height: block_height,
                    digest: block.digest().as_ref().try_into().expect("sha256"),
                    encoded: encode_block(block.inner()),
                    block: block.inner().clone(),
                    certificate,
                };
                if finalized.send_async(delivered).await.is_err() {
                    break;
                }
            }
        });

        let _ = channels.ready.send(());
        let _ = channels.stop.recv_async().await;
        let _ = context.stop(0, Some(Duration::from_secs(5))).await;
    });
}
