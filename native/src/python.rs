//! The Python bindings: `swarmserve._native`. Thin by design: argument conversion, error
//! mapping, and releasing the GIL for large cells. All logic lives in the pure-Rust modules.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use crate::chain;
use crate::error::Error;
use crate::identity;
use crate::link;
use crate::onion;
use crate::sampling;
use crate::sida;
use crate::tokens;

create_exception!(
    swarmserve._native,
    CryptoError,
    PyException,
    "Base class of every error the native core raises."
);
create_exception!(
    swarmserve._native,
    MalformedCellError,
    CryptoError,
    "A cell or onion whose shape is wrong (truncated, wrong size, unknown field)."
);
create_exception!(
    swarmserve._native,
    CellAuthenticationError,
    CryptoError,
    "A cell that failed AEAD authentication: tampered, reordered, or under the wrong key."
);
create_exception!(
    swarmserve._native,
    ReplayError,
    CryptoError,
    "A circuit set-up this relay has already accepted."
);
create_exception!(
    swarmserve._native,
    ReplayCacheFullError,
    CryptoError,
    "The replay cache is full of unexpired tags; new set-ups are refused."
);
create_exception!(
    swarmserve._native,
    SignatureError,
    CryptoError,
    "An Ed25519 signature that does not verify."
);
create_exception!(
    swarmserve._native,
    InvalidKeyError,
    CryptoError,
    "Key bytes or a key encoding that cannot be used."
);
create_exception!(
    swarmserve._native,
    KeyFileError,
    CryptoError,
    "A key file that cannot be read or written, or is readable by others."
);
create_exception!(
    swarmserve._native,
    CircuitClosedError,
    CryptoError,
    "A circuit closed by an earlier authentication failure."
);

/// Cells at least this large are processed without the GIL, so other threads keep running.
const RELEASE_GIL_AT: usize = 4096;

impl From<Error> for PyErr {
    fn from(error: Error) -> PyErr {
        let message = error.to_string();
        match error {
            Error::Malformed { .. } => MalformedCellError::new_err(message),
            Error::Authentication { .. } => CellAuthenticationError::new_err(message),
            Error::Replay => ReplayError::new_err(message),
            Error::ReplayCacheFull { .. } => ReplayCacheFullError::new_err(message),
            Error::Signature(_) => SignatureError::new_err(message),
            Error::InvalidKey(_) => InvalidKeyError::new_err(message),
            Error::KeyFile { .. } => KeyFileError::new_err(message),
            Error::CircuitClosed => CircuitClosedError::new_err(message),
            Error::InvalidArgument(_) => PyValueError::new_err(message),
        }
    }
}

fn run<T: Send>(py: Python<'_>, size: usize, work: impl FnOnce() -> T + Send) -> T {
    if size >= RELEASE_GIL_AT {
        py.allow_threads(work)
    } else {
        work()
    }
}

/// A node's long-term Ed25519 identity key.
#[pyclass(module = "swarmserve._native", frozen)]
pub(crate) struct Identity(pub(crate) identity::Identity);

#[pymethods]
impl Identity {
    /// A new random identity.
    #[staticmethod]
    fn generate() -> Self {
        Self(identity::Identity::generate())
    }

    /// The identity for a 32-byte RFC 8032 secret seed.
    #[staticmethod]
    fn from_seed(seed: &[u8]) -> PyResult<Self> {
        Ok(Self(identity::Identity::from_seed(seed)?))
    }

    /// Parses a PKCS#8 PEM Ed25519 private key.
    #[staticmethod]
    fn from_pem(pem: &str) -> PyResult<Self> {
        Ok(Self(identity::Identity::from_pem(pem)?))
    }

    /// Loads a key file; refuses files that group or others can read.
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        Ok(Self(identity::Identity::load(&path)?))
    }

    /// Writes the key as PKCS#8 PEM with mode 0600, atomically.
    fn save(&self, path: PathBuf) -> PyResult<()> {
        Ok(self.0.save(&path)?)
    }

    fn to_pem(&self) -> PyResult<String> {
        Ok(self.0.to_pem()?.to_string())
    }

    /// The 32-byte Ed25519 public key.
    #[getter]
    fn public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.public_key())
    }

    /// Lowercase hex of BLAKE3 derive_key("swarmserve v1 node id", public key).
    #[getter]
    fn node_id(&self) -> String {
        self.0.node_id()
    }

    /// The 64-byte Ed25519 signature of `message`.
    fn sign<'py>(&self, py: Python<'py>, message: &[u8]) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.sign(message))
    }

    fn __repr__(&self) -> String {
        format!("Identity(node_id='{}')", self.0.node_id())
    }
}

/// Raises SignatureError unless `signature` is `public_key`'s Ed25519 signature of `message`.
#[pyfunction]
fn verify_signature(py: Python<'_>, public_key: &[u8], message: &[u8], signature: &[u8]) -> PyResult<()> {
    // Without the GIL: gossip checks descriptors in a worker thread, off the event loop.
    Ok(py.allow_threads(|| identity::verify(public_key, message, signature))?)
}

/// The node id of an Ed25519 public key.
#[pyfunction]
fn node_id(public_key: &[u8]) -> PyResult<String> {
    Ok(identity::node_id(public_key)?)
}

/// An X25519 onion key: relays and inference nodes publish its public half in their
/// descriptors, and peel circuit set-ups with it.
#[pyclass(module = "swarmserve._native", frozen)]
struct OnionKey(identity::OnionKey);

#[pymethods]
impl OnionKey {
    #[staticmethod]
    fn generate() -> Self {
        Self(identity::OnionKey::generate())
    }

    /// The key for 32 secret bytes (RFC 7748 scalar).
    #[staticmethod]
    fn from_bytes(secret: &[u8]) -> PyResult<Self> {
        Ok(Self(identity::OnionKey::from_bytes(secret)?))
    }

    #[staticmethod]
    fn from_pem(pem: &str) -> PyResult<Self> {
        Ok(Self(identity::OnionKey::from_pem(pem)?))
    }

    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        Ok(Self(identity::OnionKey::load(&path)?))
    }

    fn save(&self, path: PathBuf) -> PyResult<()> {
        Ok(self.0.save(&path)?)
    }

    fn to_pem(&self) -> PyResult<String> {
        Ok(self.0.to_pem()?.to_string())
    }

    /// The 32 secret bytes. Handle with care: whoever holds them can peel this hop.
    fn secret_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.0.secret_bytes().as_ref())
    }

    #[getter]
    fn public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.public_key())
    }

    /// Peels exactly one layer of a set-up cell. Remembers nothing: check `replay_tag` against
    /// a ReplayCache once the set-up is accepted.
    fn peel_setup(&self, py: Python<'_>, cell: &[u8]) -> PyResult<PeeledSetup> {
        let peeled = py.allow_threads(|| self.0.peel_setup(cell))?;
        let (is_final, routing_info, next_cell, payload) = match peeled.next {
            onion::SetupNext::Forward { routing_info, cell } => (false, routing_info, Some(cell), None),
            onion::SetupNext::Final { routing_info, payload } => (true, routing_info, None, Some(payload)),
        };
        Ok(PeeledSetup {
            is_final,
            routing_info,
            next_cell,
            payload,
            replay_tag: peeled.replay_tag,
            hop: Py::new(py, CircuitHop(Some(peeled.hop)))?,
        })
    }
}

/// Replay tags of accepted set-ups, each kept for `ttl_seconds`; at most `capacity` at once.
#[pyclass(module = "swarmserve._native")]
struct ReplayCache(onion::ReplayCache);

#[pymethods]
impl ReplayCache {
    #[new]
    fn new(capacity: usize, ttl_seconds: f64) -> PyResult<Self> {
        let ttl = Duration::try_from_secs_f64(ttl_seconds).map_err(|_| {
            PyValueError::new_err(format!(
                "ttl_seconds must be a finite, non-negative number, got {ttl_seconds}"
            ))
        })?;
        Ok(Self(onion::ReplayCache::new(capacity, ttl)?))
    }

    /// Raises ReplayError if `tag` was seen within the ttl; otherwise remembers it.
    fn check_and_remember(&mut self, tag: &[u8]) -> PyResult<()> {
        let tag: [u8; 32] = tag
            .try_into()
            .map_err(|_| PyValueError::new_err(format!("a replay tag is 32 bytes, got {}", tag.len())))?;
        Ok(self.0.check_and_remember(tag)?)
    }

    fn __len__(&self) -> usize {
        self.0.len()
    }
}

/// One peeled set-up layer: where to go next (or the payload, at the last hop) and the hop's
/// data-cell state.
#[pyclass(module = "swarmserve._native", frozen)]
struct PeeledSetup {
    is_final: bool,
    routing_info: Vec<u8>,
    next_cell: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    replay_tag: [u8; 32],
    hop: Py<CircuitHop>,
}

#[pymethods]
impl PeeledSetup {
    /// True when this hop terminates the circuit.
    #[getter]
    fn is_final(&self) -> bool {
        self.is_final
    }

    /// The routing info the router gave this hop (the next hop's address, for a relay).
    #[getter]
    fn routing_info<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.routing_info)
    }

    /// The set-up cell for the next hop (None at the last hop).
    #[getter]
    fn next_cell<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.next_cell.as_deref().map(|c| PyBytes::new(py, c))
    }

    /// The router's payload for the last hop (None at a relay).
    #[getter]
    fn payload<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.payload.as_deref().map(|p| PyBytes::new(py, p))
    }

    #[getter]
    fn replay_tag<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.replay_tag)
    }

    /// This hop's data-cell state for the circuit.
    #[getter]
    fn hop(&self, py: Python<'_>) -> Py<CircuitHop> {
        self.hop.clone_ref(py)
    }
}

/// A relay's (or the terminating node's) side of one circuit. Handed to a [`LinkEngine`], it is
/// the engine's: this object then refuses every cell (CircuitClosedError).
#[pyclass(module = "swarmserve._native")]
struct CircuitHop(Option<onion::CircuitHop>);

impl CircuitHop {
    fn inner(&mut self) -> Result<&mut onion::CircuitHop, Error> {
        self.0.as_mut().ok_or(Error::CircuitClosed)
    }
}

#[pymethods]
impl CircuitHop {
    /// Removes this hop's layer from a forward cell.
    fn peel_forward<'py>(&mut self, py: Python<'py>, cell: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let inner = self.inner()?;
        if cell.len() < onion::TAG_SIZE {
            // Let the core report (and close the hop) before sizing an output buffer.
            inner.peel_forward(cell)?;
        }
        // Written straight into the new bytes object: one copy, no intermediate buffer.
        PyBytes::new_with(py, cell.len() - onion::TAG_SIZE, |out| {
            Ok(run(py, cell.len(), || inner.peel_forward_into(cell, out))?)
        })
    }

    /// Adds this hop's layer to a backward cell.
    fn wrap_backward<'py>(&mut self, py: Python<'py>, cell: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let inner = self.inner()?;
        PyBytes::new_with(py, cell.len() + onion::TAG_SIZE, |out| {
            Ok(run(py, cell.len(), || inner.wrap_backward_into(cell, out))?)
        })
    }
}

/// (onion public key, routing info) pairs as the core takes them.
fn hop_specs(hops: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<onion::HopSpec<'_>>, Error> {
    hops.iter()
        .enumerate()
        .map(|(index, (key, routing_info))| {
            let onion_key: [u8; 32] = key.as_slice().try_into().map_err(|_| {
                Error::InvalidKey(format!("onion key of hop {index} must be 32 bytes, got {}", key.len()))
            })?;
            Ok(onion::HopSpec {
                onion_key,
                routing_info,
            })
        })
        .collect()
}

/// Circuits multiplexed over links, every per-cell step native (`link.rs`); the caller moves
/// frames between links and decides set-ups. Events are tuples: ("setup", link, circuit,
/// onion), ("opened", handle), ("message", handle, plaintext), ("closed", handle, reason),
/// ("released", link, circuit, reason).
#[pyclass(module = "swarmserve._native")]
struct LinkEngine {
    inner: link::Engine,
}

#[pymethods]
impl LinkEngine {
    #[new]
    #[pyo3(signature = (max_cell_bytes = 65536))]
    fn new(max_cell_bytes: usize) -> Self {
        LinkEngine {
            inner: link::Engine::new(max_cell_bytes),
        }
    }

    /// Processes a frame that arrived on `link`; MalformedCellError: none of it was processed
    /// (drop the link).
    fn receive(&mut self, link: u64, frame: &[u8]) -> PyResult<()> {
        let now = Instant::now();
        Ok(self.inner.receive(link, frame, now)?)
    }

    /// Passes the set-up waiting on (`link`, `circuit`) on over `out_link`; `hop` becomes the
    /// engine's.
    fn extend(
        &mut self,
        link: u64,
        circuit: u32,
        hop: &mut CircuitHop,
        out_link: u64,
        next_cell: &[u8],
    ) -> PyResult<()> {
        let taken = hop.0.take().ok_or(Error::CircuitClosed)?;
        let now = Instant::now();
        Ok(self.inner.extend(link, circuit, taken, out_link, next_cell, now)?)
    }

    /// Terminates the set-up waiting on (`link`, `circuit`) here, as `handle`; `hop` becomes
    /// the engine's.
    fn terminate(&mut self, link: u64, circuit: u32, hop: &mut CircuitHop, handle: u64) -> PyResult<()> {
        let taken = hop.0.take().ok_or(Error::CircuitClosed)?;
        let now = Instant::now();
        Ok(self.inner.terminate(link, circuit, taken, handle, now)?)
    }

    /// Refuses the set-up waiting on (`link`, `circuit`) with a DestroyReason.
    fn refuse(&mut self, link: u64, circuit: u32, reason: u8) -> PyResult<()> {
        Ok(self.inner.refuse(link, circuit, reason)?)
    }

    /// Starts circuit `handle` over `link` through `hops` ((onion key, routing info) pairs, as
    /// :meth:`Circuit.build`); an "opened" event says when it is confirmed.
    fn originate(&mut self, link: u64, hops: Vec<(Vec<u8>, Vec<u8>)>, handle: u64) -> PyResult<()> {
        let (onion, circuit) = onion::Circuit::build(&hop_specs(&hops)?, b"")?;
        let now = Instant::now();
        Ok(self.inner.originate(link, circuit, &onion, handle, now)?)
    }

    /// Sends `plaintext` on `handle`'s circuit (from its origin or its exit).
    fn send(&mut self, handle: u64, plaintext: &[u8]) -> PyResult<()> {
        let now = Instant::now();
        Ok(self.inner.send(handle, plaintext, now)?)
    }

    /// Closes `handle`'s circuit from this end with a DestroyReason.
    fn close(&mut self, handle: u64, reason: u8) {
        self.inner.close_handle(handle, reason);
    }

    /// `link` is gone: its circuits close, the other sides are told.
    fn link_lost(&mut self, link: u64) {
        self.inner.link_lost(link);
    }

    /// Closes circuits idle for `idle_s` seconds.
    fn expire(&mut self, idle_s: f64) -> PyResult<()> {
        let idle = Duration::try_from_secs_f64(idle_s).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let now = Instant::now();
        self.inner.expire(now, idle);
        Ok(())
    }

    /// Frames to send now: (link, frame) for each link with output, whole cells up to
    /// `max_frame_bytes` each.
    fn take_frames<'py>(&mut self, py: Python<'py>, max_frame_bytes: usize) -> Vec<(u64, Bound<'py, PyBytes>)> {
        self.inner
            .take_frames(max_frame_bytes)
            .into_iter()
            .map(|(link, frame)| (link, PyBytes::new(py, &frame)))
            .collect()
    }

    /// What happened since the last call, in order.
    fn take_events(&mut self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
        self.inner
            .take_events()
            .into_iter()
            .map(|event| {
                Ok(match event {
                    link::Event::Setup { link, circuit, onion } => ("setup", link, circuit, PyBytes::new(py, &onion))
                        .into_pyobject(py)?
                        .into_any()
                        .unbind(),
                    link::Event::Opened { handle } => ("opened", handle).into_pyobject(py)?.into_any().unbind(),
                    link::Event::Message { handle, plaintext } => ("message", handle, PyBytes::new(py, &plaintext))
                        .into_pyobject(py)?
                        .into_any()
                        .unbind(),
                    link::Event::Closed { handle, reason } => {
                        ("closed", handle, reason).into_pyobject(py)?.into_any().unbind()
                    }
                    link::Event::Released { link, circuit, reason } => ("released", link, circuit, reason)
                        .into_pyobject(py)?
                        .into_any()
                        .unbind(),
                })
            })
            .collect()
    }

    /// Circuits held (each relayed circuit counts once per link it crosses).
    #[getter]
    fn circuits(&self) -> usize {
        self.inner.circuits()
    }

    /// (forward cells, backward cells, forward bytes, backward bytes) passed on.
    #[getter]
    fn forwarded(&self) -> (u64, u64, u64, u64) {
        let f = self.inner.forwarded;
        (f.forward_cells, f.backward_cells, f.forward_bytes, f.backward_bytes)
    }
}

/// The router's side of a circuit.
#[pyclass(module = "swarmserve._native")]
struct Circuit {
    inner: onion::Circuit,
    /// Reused for unwrapping so the per-cell path does not allocate.
    scratch: Vec<u8>,
}

#[pymethods]
impl Circuit {
    /// Builds the set-up onion through `hops`, a sequence of (onion public key, routing info)
    /// pairs; the last hop terminates the circuit and receives `payload`. Returns the
    /// set-up cell for hop 0 and the circuit.
    #[staticmethod]
    #[pyo3(signature = (hops, payload = b"".to_vec()))]
    fn build(hops: Vec<(Vec<u8>, Vec<u8>)>, payload: Vec<u8>) -> PyResult<(Vec<u8>, Circuit)> {
        let (cell, circuit) = onion::Circuit::build(&hop_specs(&hops)?, &payload)?;
        Ok((
            cell,
            Circuit {
                inner: circuit,
                scratch: Vec::new(),
            },
        ))
    }

    /// Number of layers (relays plus the terminating node).
    #[getter]
    fn layers(&self) -> usize {
        self.inner.layers()
    }

    /// Seals a forward data cell once per hop.
    fn wrap_forward<'py>(&mut self, py: Python<'py>, plaintext: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let inner = &mut self.inner;
        PyBytes::new_with(py, inner.forward_cell_len(plaintext.len()), |out| {
            Ok(run(py, plaintext.len(), || inner.wrap_forward_into(plaintext, out))?)
        })
    }

    /// Strips every hop's layer from a backward cell.
    fn unwrap_backward<'py>(&mut self, py: Python<'py>, cell: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let (inner, scratch) = (&mut self.inner, &mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(cell);
        let len = run(py, cell.len(), || inner.unwrap_backward_in_place(scratch))?;
        Ok(PyBytes::new(py, &scratch[..len]))
    }
}

/// The incremental token-stream hash chain an inference node feeds as it emits tokens.
#[pyclass(module = "swarmserve._native")]
struct TokenStreamHasher(chain::TokenStreamHasher);

#[pymethods]
impl TokenStreamHasher {
    #[new]
    fn new(request_id: &[u8], model_digest: &[u8], prompt_digest: &[u8], sampling: &[u8]) -> PyResult<Self> {
        Ok(Self(chain::TokenStreamHasher::new(
            request_id,
            model_digest,
            prompt_digest,
            sampling,
        )?))
    }

    /// Extends the chain by one token: its id and the exact text bytes sent for it.
    fn update(&mut self, token_id: u32, text: &[u8]) -> PyResult<()> {
        Ok(self.0.update(token_id, text)?)
    }

    /// Tokens hashed so far.
    #[getter]
    fn count(&self) -> u64 {
        self.0.count()
    }

    /// The current chain link.
    #[getter]
    fn head<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.head())
    }

    /// The commitment over every token so far; the hasher stays usable.
    fn commitment<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.commitment())
    }
}

/// The verifiable sampler of one stream (see `sampling.rs`). Logits are any buffer of float32
/// (a numpy row); they are copied once and processed without the GIL.
#[pyclass(module = "swarmserve._native")]
struct Sampler(sampling::Sampler);

fn logits_of(py: Python<'_>, logits: &Bound<'_, PyAny>) -> PyResult<Vec<f32>> {
    PyBuffer::<f32>::get(logits)?.to_vec(py)
}

#[pymethods]
impl Sampler {
    #[new]
    #[pyo3(signature = (temperature, top_k, top_p, repetition_penalty, seed, prompt_ids))]
    fn new(
        temperature: f32,
        top_k: u32,
        top_p: f32,
        repetition_penalty: f32,
        seed: u64,
        prompt_ids: Vec<u32>,
    ) -> PyResult<Self> {
        let params = sampling::SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty,
        };
        Ok(Self(sampling::Sampler::new(params, seed, &prompt_ids)?))
    }

    /// Chooses the token at the current position and moves past it.
    fn choose(&mut self, py: Python<'_>, logits: &Bound<'_, PyAny>) -> PyResult<u32> {
        let logits = logits_of(py, logits)?;
        let inner = &mut self.0;
        Ok(py.allow_threads(|| inner.choose(&logits))?)
    }

    /// Every token an honest node could have chosen here, in id order; does not move.
    fn plausible(&self, py: Python<'_>, logits: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
        let logits = logits_of(py, logits)?;
        let inner = &self.0;
        Ok(py.allow_threads(|| inner.plausible(&logits))?)
    }

    /// Moves past the token served at the current position.
    fn advance(&mut self, token_id: u32) {
        self.0.advance(token_id);
    }

    /// Completion positions passed so far.
    #[getter]
    fn position(&self) -> u64 {
        self.0.position()
    }
}

/// The uniform number in [0, 1) that drives the choice at a completion position.
#[pyfunction]
fn sampling_uniform(seed: u64, position: u64) -> f64 {
    sampling::uniform(seed, position)
}

/// The commitment over a whole token stream in one call (for verifiers).
#[pyfunction]
fn token_stream_commitment<'py>(
    py: Python<'py>,
    request_id: &[u8],
    model_digest: &[u8],
    prompt_digest: &[u8],
    sampling: &[u8],
    token_ids: Vec<u32>,
    texts: Vec<PyBackedBytes>,
) -> PyResult<Bound<'py, PyBytes>> {
    // PyBackedBytes borrows each bytes object's buffer: no copy per token.
    let size = texts.iter().map(|t| t.len()).sum::<usize>() + 48 * texts.len();
    let commitment = run(py, size, || {
        chain::token_stream_commitment(request_id, model_digest, prompt_digest, sampling, &token_ids, &texts)
    })?;
    Ok(PyBytes::new(py, &commitment))
}

/// Splits a message into `n` S-IDA shares, any `k` of which rebuild it (see `sida.rs`).
#[pyfunction]
fn sida_split(py: Python<'_>, message: &[u8], n: u8, k: u8) -> PyResult<Vec<Py<PyBytes>>> {
    let shares = run(py, message.len() * 2, || sida::split(message, n, k))?;
    Ok(shares.iter().map(|share| PyBytes::new(py, share).unbind()).collect())
}

/// Rebuilds a message from at least `k` of its S-IDA shares.
#[pyfunction]
fn sida_combine<'py>(py: Python<'py>, shares: Vec<PyBackedBytes>) -> PyResult<Bound<'py, PyBytes>> {
    let size = shares.iter().map(|s| s.len()).sum::<usize>();
    let message = run(py, size, || {
        let borrowed: Vec<&[u8]> = shares.iter().map(|s| &s[..]).collect();
        sida::combine(&borrowed)
    })?;
    Ok(PyBytes::new(py, &message))
}

/// (index, k, n) of an S-IDA share, after checking its header.
#[pyfunction]
fn sida_share_info(share: &[u8]) -> PyResult<(u8, u8, u8)> {
    Ok(sida::share_info(share)?)
}

/// A provider's payment-token key: issues blinded tokens and checks redeemed ones
/// (RFC 9497 VOPRF, ristretto255-SHA512). Derived from a 32-byte secret seed.
#[pyclass(module = "swarmserve._native", frozen)]
struct TokenIssuer(tokens::TokenIssuer);

#[pymethods]
impl TokenIssuer {
    #[new]
    fn new(seed: &[u8]) -> PyResult<Self> {
        Ok(Self(tokens::TokenIssuer::from_seed(seed)?))
    }

    #[getter]
    fn public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.public_key())
    }

    /// Evaluates blinded tokens: (evaluated elements, proof).
    fn issue<'py>(
        &self,
        py: Python<'py>,
        blinded: Vec<Vec<u8>>,
    ) -> PyResult<(Vec<Bound<'py, PyBytes>>, Bound<'py, PyBytes>)> {
        let (evaluated, proof) = py.allow_threads(|| self.0.issue(&blinded))?;
        Ok((
            evaluated.iter().map(|e| PyBytes::new(py, e)).collect(),
            PyBytes::new(py, &proof),
        ))
    }

    /// Whether (nonce, output) is a token of this key (spent or not).
    fn check(&self, py: Python<'_>, nonce: &[u8], output: &[u8]) -> bool {
        py.allow_threads(|| self.0.check(nonce, output))
    }
}

/// The payer's side of one token issuance: random nonces, blinded.
#[pyclass(module = "swarmserve._native", frozen)]
struct TokenRequest(tokens::TokenRequest);

#[pymethods]
impl TokenRequest {
    #[new]
    fn new(count: usize) -> PyResult<Self> {
        Ok(Self(tokens::TokenRequest::new(count)?))
    }

    /// The blinded elements to send to the issuer.
    #[getter]
    fn blinded<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        self.0.blinded().iter().map(|b| PyBytes::new(py, b)).collect()
    }

    /// The tokens as (nonce, output) pairs; raises CellAuthenticationError if the proof does not
    /// verify under `public_key`.
    fn finalize<'py>(
        &self,
        py: Python<'py>,
        evaluated: Vec<Vec<u8>>,
        proof: &[u8],
        public_key: &[u8],
    ) -> PyResult<Vec<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)>> {
        let tokens = py.allow_threads(|| self.0.finalize(&evaluated, proof, public_key))?;
        Ok(tokens
            .iter()
            .map(|(n, o)| (PyBytes::new(py, n), PyBytes::new(py, o)))
            .collect())
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("CryptoError", py.get_type::<CryptoError>())?;
    m.add("MalformedCellError", py.get_type::<MalformedCellError>())?;
    m.add("CellAuthenticationError", py.get_type::<CellAuthenticationError>())?;
    m.add("ReplayError", py.get_type::<ReplayError>())?;
    m.add("ReplayCacheFullError", py.get_type::<ReplayCacheFullError>())?;
    m.add("SignatureError", py.get_type::<SignatureError>())?;
    m.add("InvalidKeyError", py.get_type::<InvalidKeyError>())?;
    m.add("KeyFileError", py.get_type::<KeyFileError>())?;
    m.add("CircuitClosedError", py.get_type::<CircuitClosedError>())?;

    m.add("SETUP_CELL_SIZE", onion::SETUP_CELL_SIZE)?;
    m.add("CIRCUIT_READY", PyBytes::new(m.py(), link::CIRCUIT_READY))?;
    m.add("MAX_LAYERS", onion::MAX_LAYERS)?;
    m.add("ROUTING_INFO_MAX", onion::ROUTING_INFO_MAX)?;
    m.add("SETUP_PAYLOAD_MAX", onion::SETUP_PAYLOAD_MAX)?;
    m.add("TAG_SIZE", onion::TAG_SIZE)?;

    m.add_class::<Identity>()?;
    m.add_class::<OnionKey>()?;
    m.add_class::<ReplayCache>()?;
    m.add_class::<PeeledSetup>()?;
    m.add_class::<CircuitHop>()?;
    m.add_class::<Circuit>()?;
    m.add_class::<LinkEngine>()?;
    m.add_class::<TokenStreamHasher>()?;
    m.add_class::<TokenIssuer>()?;
    m.add_class::<TokenRequest>()?;
    m.add("TOKEN_BATCH_MAX", tokens::MAX_BATCH)?;
    m.add_class::<Sampler>()?;
    m.add_function(wrap_pyfunction!(sampling_uniform, m)?)?;
    m.add("SAMPLING_CDF_TOLERANCE", sampling::CDF_TOLERANCE)?;
    m.add("SAMPLING_LOGIT_TOLERANCE", sampling::LOGIT_TOLERANCE)?;
    m.add("SAMPLING_PENALTY_WINDOW", sampling::PENALTY_WINDOW)?;
    m.add_function(wrap_pyfunction!(verify_signature, m)?)?;
    m.add_function(wrap_pyfunction!(node_id, m)?)?;
    m.add_function(wrap_pyfunction!(token_stream_commitment, m)?)?;
    m.add_function(wrap_pyfunction!(sida_split, m)?)?;
    m.add_function(wrap_pyfunction!(sida_combine, m)?)?;
    m.add_function(wrap_pyfunction!(sida_share_info, m)?)?;
    m.add("SIDA_MAX_SHARES", sida::MAX_SHARES)?;
    crate::python_consensus::register(m)?;
    Ok(())
}
