//! Python bindings of the ledger's consensus node (`swarmserve._native`): argument conversion
//! and error mapping only; blocking calls release the GIL.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::consensus::block::{decode_block, Block, BlockLimits};
use crate::consensus::node::{Committee, FinalizedBlock, Node, NodeConfig, NodeError, ONE_EPOCH};
use crate::consensus::proofs::{self, ProofError as ProofFailure};
use crate::python::Identity;

create_exception!(
    swarmserve._native,
    ConsensusError,
    PyException,
    "Base class of the consensus node's errors."
);
create_exception!(
    swarmserve._native,
    ConsensusStoppedError,
    ConsensusError,
    "The consensus node is not running (it was stopped, or it failed; the message says why)."
);
create_exception!(
    swarmserve._native,
    MempoolFullError,
    ConsensusError,
    "The node's transaction pool is full; the transaction was not queued."
);
create_exception!(
    swarmserve._native,
    ProofError,
    ConsensusError,
    "A finalization certificate or equivocation evidence that does not prove what it claims."
);

fn node_error(error: NodeError) -> PyErr {
    match error {
        NodeError::Config(_) | NodeError::TooLarge { .. } => PyValueError::new_err(error.to_string()),
        NodeError::Full => MempoolFullError::new_err(error.to_string()),
        NodeError::Stopped(_) => ConsensusStoppedError::new_err(error.to_string()),
    }
}

fn proof_error(error: ProofFailure) -> PyErr {
    match error {
        ProofFailure::Committee(_) => PyValueError::new_err(error.to_string()),
        _ => ProofError::new_err(error.to_string()),
    }
}

fn key32(bytes: &[u8], what: &str) -> PyResult<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| PyValueError::new_err(format!("{what} must be 32 bytes, got {}", bytes.len())))
}

fn address(text: &str) -> PyResult<SocketAddr> {
    text.parse()
        .map_err(|e| PyValueError::new_err(format!("{text:?} is not an IP:port address: {e}")))
}

/// A finalized (or decoded) block of the ledger's chain.
#[pyclass(module = "swarmserve._native", frozen, get_all)]
struct ChainBlock {
    height: u64,
    digest: Py<PyBytes>,
    parent: Py<PyBytes>,
    timestamp_ms: u64,
    transactions: Vec<Py<PyBytes>>,
    encoded: Py<PyBytes>,
    certificate: Option<Py<PyBytes>>,
}

impl ChainBlock {
    fn new(py: Python<'_>, block: &Block, encoded: &[u8], certificate: Option<&[u8]>) -> Self {
        use commonware_cryptography::Digestible;
        Self {
            height: block.height.get(),
            digest: PyBytes::new(py, block.digest().as_ref()).unbind(),
            parent: PyBytes::new(py, block.parent.as_ref()).unbind(),
            timestamp_ms: block.timestamp_ms,
            transactions: block
                .transactions
                .iter()
                .map(|t| PyBytes::new(py, t).unbind())
                .collect(),
            encoded: PyBytes::new(py, encoded).unbind(),
            certificate: certificate.map(|c| PyBytes::new(py, c).unbind()),
        }
    }

    fn finalized(py: Python<'_>, block: FinalizedBlock) -> Self {
        Self::new(py, &block.block, &block.encoded, block.certificate.as_deref())
    }
}

#[pymethods]
impl ChainBlock {
    fn __repr__(&self) -> String {
        format!(
            "ChainBlock(height={}, transactions={})",
            self.height,
            self.transactions.len()
        )
    }
}

/// A validator of the ledger's chain, running on its own thread (see `native/src/consensus`).
#[pyclass(module = "swarmserve._native")]
struct ConsensusNode(Node);

/// A committee as Python passes it: (key, "IP:port") pairs.
type PyCommittee = Vec<(Vec<u8>, String)>;

fn committee(validators: &[(Vec<u8>, String)]) -> PyResult<Committee> {
    validators
        .iter()
        .map(|(key, addr)| Ok((key32(key, "a validator key")?, address(addr)?)))
        .collect()
}

#[pymethods]
impl ConsensusNode {
    #[new]
    #[pyo3(signature = (
        identity, storage_directory, listen, validators, genesis, *,
        epoch = 0, epoch_length = None, floor = None, earlier_committees = Vec::new(), max_committee = None,
        equivocate = false,
        block_interval_ms = 500, leader_timeout_ms = 1000, max_transactions = 256,
        max_transaction_bytes = 32768, mempool_transactions = 10000, mempool_bytes = 67108864,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        identity: &Identity,
        storage_directory: PathBuf,
        listen: &str,
        validators: Vec<(Vec<u8>, String)>,
        genesis: Vec<u8>,
        epoch: u64,
        epoch_length: Option<u64>,
        floor: Option<Vec<u8>>,
        earlier_committees: Vec<(u64, PyCommittee)>,
        max_committee: Option<usize>,
        equivocate: bool,
        block_interval_ms: u64,
        leader_timeout_ms: u64,
        max_transactions: usize,
        max_transaction_bytes: usize,
        mempool_transactions: usize,
        mempool_bytes: usize,
    ) -> PyResult<Self> {
        let mut committees = BTreeMap::new();
        for (earlier, members) in &earlier_committees {
            committees.insert(*earlier, committee(members)?);
        }
        committees.insert(epoch, committee(&validators)?);
        let max_committee = max_committee.unwrap_or_else(|| committees.values().map(Vec::len).max().unwrap_or(1));
        let floor = floor.map(|f| key32(&f, "floor")).transpose()?;
        if leader_timeout_ms == 0 || max_transactions == 0 || max_transaction_bytes == 0 {
            return Err(PyValueError::new_err(
                "leader_timeout_ms, max_transactions and max_transaction_bytes must be positive",
            ));
        }
        let config = NodeConfig {
            seed: *identity.0.seed(),
            storage_directory,
            listen: address(listen)?,
            epoch,
            committees,
            epoch_length: epoch_length.unwrap_or(ONE_EPOCH),
            floor,
            max_committee,
            genesis,
            equivocate,
            limits: BlockLimits {
                max_transactions,
                max_transaction_bytes,
            },
            block_interval: Duration::from_millis(block_interval_ms),
            leader_timeout: Duration::from_millis(leader_timeout_ms),
            mempool_transactions,
            mempool_bytes,
        };
        let node = py.allow_threads(|| Node::start(config)).map_err(node_error)?;
        Ok(Self(node))
    }

    #[getter]
    fn public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.public_key())
    }

    /// Queues a transaction and passes it to the other validators; False if already queued.
    fn submit(&self, transaction: &[u8]) -> PyResult<bool> {
        self.0.submit(Bytes::copy_from_slice(transaction)).map_err(node_error)
    }

    /// Makes `validators` the committee of `epoch` (call it once the last block of the epoch
    /// before is applied).
    fn add_committee(&self, epoch: u64, validators: Vec<(Vec<u8>, String)>) -> PyResult<()> {
        let validators = committee(&validators)?;
        self.0.add_committee(epoch, &validators).map_err(node_error)
    }

    /// Moves to `epoch`, whose genesis is `floor` (the digest of the last block before it): the
    /// old engine stops, a new one starts if this node is in the epoch's committee.
    fn enter_epoch(&self, epoch: u64, floor: &[u8]) -> PyResult<()> {
        self.0.enter_epoch(epoch, key32(floor, "floor")?).map_err(node_error)
    }

    /// The epoch the node is in.
    #[getter]
    fn epoch(&self) -> u64 {
        self.0.epoch()
    }

    /// The next finalized block, in height order from genesis, or None after `timeout_s`.
    fn next_finalized(&self, py: Python<'_>, timeout_s: f64) -> PyResult<Option<ChainBlock>> {
        let timeout = Duration::from_secs_f64(timeout_s.max(0.0));
        let node = &self.0;
        let block = py.allow_threads(|| node.next_finalized(timeout)).map_err(node_error)?;
        Ok(block.map(|b| ChainBlock::finalized(py, b)))
    }

    /// Every block up to `height` is durably applied; until then it is delivered again after a restart.
    fn acknowledge(&self, height: u64) {
        self.0.acknowledge(height);
    }

    /// Verified evidence of a validator's conflicting votes, or None after `timeout_s`.
    fn next_evidence<'py>(&self, py: Python<'py>, timeout_s: f64) -> Option<Bound<'py, PyBytes>> {
        let timeout = Duration::from_secs_f64(timeout_s.max(0.0));
        let node = &self.0;
        py.allow_threads(|| node.next_evidence(timeout))
            .map(|e| PyBytes::new(py, &e))
    }

    fn pending_transactions(&self) -> usize {
        self.0.pending_transactions()
    }

    fn is_running(&self) -> bool {
        self.0.is_running()
    }

    /// Stops the node and waits for its thread.
    fn stop(&mut self, py: Python<'_>) -> PyResult<()> {
        let node = &mut self.0;
        py.allow_threads(|| node.stop()).map_err(node_error)
    }
}

/// Decodes a block's canonical encoding (within the given limits).
#[pyfunction]
#[pyo3(signature = (encoded, *, max_transactions = 256, max_transaction_bytes = 32768))]
fn decode_chain_block(
    py: Python<'_>,
    encoded: &[u8],
    max_transactions: usize,
    max_transaction_bytes: usize,
) -> PyResult<ChainBlock> {
    let limits = BlockLimits {
        max_transactions,
        max_transaction_bytes,
    };
    let block = decode_block(encoded, &limits).map_err(|e| ProofError::new_err(format!("malformed block: {e}")))?;
    Ok(ChainBlock::new(py, &block, encoded, None))
}

/// A block's canonical encoding (for tools and tests; validators build their own blocks).
#[pyfunction]
fn encode_chain_block<'py>(
    py: Python<'py>,
    parent: &[u8],
    height: u64,
    timestamp_ms: u64,
    transactions: Vec<Vec<u8>>,
) -> PyResult<Bound<'py, PyBytes>> {
    use commonware_codec::DecodeExt;
    let parent = commonware_cryptography::sha256::Digest::decode(commonware_codec::Copying(parent))
        .map_err(|_| PyValueError::new_err("parent must be a 32-byte digest"))?;
    let block = Block {
        parent,
        height: commonware_consensus::types::Height::new(height),
        timestamp_ms,
        transactions: transactions.into_iter().map(Bytes::from).collect(),
    };
    Ok(PyBytes::new(py, &crate::consensus::block::encode_block(&block)))
}

/// Checks a finalization certificate against the committee: (epoch, view, finalized block digest).
#[pyfunction]
fn verify_finalization<'py>(
    py: Python<'py>,
    validators: Vec<Vec<u8>>,
    certificate: &[u8],
) -> PyResult<(u64, u64, Bound<'py, PyBytes>)> {
    let committee = validators
        .iter()
        .map(|k| key32(k, "a validator key"))
        .collect::<PyResult<Vec<_>>>()?;
    let proven = proofs::verify_finalization(&committee, certificate).map_err(proof_error)?;
    Ok((proven.epoch, proven.view, PyBytes::new(py, &proven.digest)))
}

/// Signs two conflicting notarize votes in one view with `identity` (a validator), as an
/// equivocating validator would, and returns them as evidence. For adversarial tests.
#[pyfunction]
fn sign_conflicting_votes<'py>(
    py: Python<'py>,
    identity: &Identity,
    validators: Vec<Vec<u8>>,
    epoch: u64,
    view: u64,
) -> PyResult<Bound<'py, PyBytes>> {
    let committee = validators
        .iter()
        .map(|k| key32(k, "a validator key"))
        .collect::<PyResult<Vec<_>>>()?;
    let evidence =
        proofs::sign_conflicting_notarize(&committee, &identity.0.seed(), epoch, view).map_err(proof_error)?;
    Ok(PyBytes::new(py, &evidence))
}

/// The epoch that evidence of conflicting votes names (unchecked: verify it against that
/// epoch's committee with `verify_equivocation`).
#[pyfunction]
fn equivocation_epoch(evidence: &[u8]) -> PyResult<u64> {
    proofs::equivocation_epoch(evidence).map_err(proof_error)
}

/// Checks evidence of conflicting votes: (kind, epoch, view, the equivocating validator's key).
#[pyfunction]
fn verify_equivocation<'py>(
    py: Python<'py>,
    validators: Vec<Vec<u8>>,
    evidence: &[u8],
) -> PyResult<(&'static str, u64, u64, Bound<'py, PyBytes>)> {
    let committee = validators
        .iter()
        .map(|k| key32(k, "a validator key"))
        .collect::<PyResult<Vec<_>>>()?;
    let proven = proofs::verify_equivocation(&committee, evidence).map_err(proof_error)?;
    Ok((
        proven.kind,
        proven.epoch,
        proven.view,
        PyBytes::new(py, &proven.validator),
    ))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ConsensusError", py.get_type::<ConsensusError>())?;
    m.add("ConsensusStoppedError", py.get_type::<ConsensusStoppedError>())?;
    m.add("MempoolFullError", py.get_type::<MempoolFullError>())?;
    m.add("ProofError", py.get_type::<ProofError>())?;
    m.add_class::<ChainBlock>()?;
    m.add_class::<ConsensusNode>()?;
    m.add_function(wrap_pyfunction!(decode_chain_block, m)?)?;
    m.add_function(wrap_pyfunction!(encode_chain_block, m)?)?;
    m.add_function(wrap_pyfunction!(verify_finalization, m)?)?;
    m.add_function(wrap_pyfunction!(verify_equivocation, m)?)?;
    m.add_function(wrap_pyfunction!(equivocation_epoch, m)?)?;
    m.add_function(wrap_pyfunction!(sign_conflicting_votes, m)?)?;
    Ok(())
}
