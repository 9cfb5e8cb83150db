//! Onion circuits: a fixed-size set-up onion, then per-hop authenticated data layers.
//!
//! # Set-up
//! The router picks hops `0..L` (relays, then the node that terminates the circuit) and, per
//! hop, an ephemeral X25519 key `e_j`. With the hop's published onion key `P_j`:
//!
//! ```text
//! shared_j = X25519(e_j, P_j)                        (all-zero results are refused)
//! okm_j    = HKDF-SHA256(salt = "swarmserve/v1 onion hop", ikm = shared_j,
//!                        info = "swarmserve/v1 onion keys" || E_j || P_j)
//!          = header key | forward key | backward key | replay tag | pad      (32|32|32|32|176)
//! ```
//!
//! Every set-up cell is exactly [`SETUP_CELL_SIZE`] bytes: `E_j (32) || tag (16) || ct (C)`,
//! where `ct` is ChaCha20-Poly1305 under the header key (nonce 0, used once) of
//! `slot (128) || rest`. A forward slot names the next hop; the relay passes on
//! `rest || pad_j`, where `pad_j` comes from its own key material, so every relay sees a cell of
//! the same size whatever its position on the path. The router precomputes what those pads
//! become (the "filler", as in Sphinx) so that every hop's tag still verifies. The final slot
//! carries the payload for the node that terminates the circuit.
//!
//! # Data
//! After set-up each hop holds a forward and a backward key. Forward cells are sealed by the
//! router once per hop (innermost = last hop) and each hop peels one layer; backward cells get
//! one layer per hop and the router strips them all. Nonces are per-direction counters, so a
//! dropped, duplicated or reordered cell fails authentication; the first failure closes the
//! circuit for good.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hkdf::Hkdf;
use rand_core::OsRng;
use sha2::Sha256;
use x25519_dalek::{EphemeralSecret, PublicKey};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::identity::OnionKey;

/// Size of every set-up cell on the wire, at every hop.
pub const SETUP_CELL_SIZE: usize = 2048;
/// Most layers one circuit may have (relays plus the terminating node).
pub const MAX_LAYERS: usize = 8;
/// Per-hop routing slot: kind (1) + length (1) + routing info.
pub const ROUTING_SLOT_SIZE: usize = 128;
/// Longest routing info one hop can be given (an address, for instance).
pub const ROUTING_INFO_MAX: usize = ROUTING_SLOT_SIZE - 2;
/// AEAD tag length (Poly1305).
pub const TAG_SIZE: usize = 16;
const KEY_SIZE: usize = 32;
const LAYER_OVERHEAD: usize = KEY_SIZE + TAG_SIZE;
/// The bytes one hop removes from the set-up onion (and replaces with its pad).
const HOP_SPAN: usize = ROUTING_SLOT_SIZE + LAYER_OVERHEAD;
const SETUP_CT_SIZE: usize = SETUP_CELL_SIZE - LAYER_OVERHEAD;
/// Largest payload the set-up onion can deliver to the terminating node, for any path length.
pub const SETUP_PAYLOAD_MAX: usize = SETUP_CT_SIZE - ROUTING_SLOT_SIZE - 2 - (MAX_LAYERS - 1) * HOP_SPAN;

const SLOT_FORWARD: u8 = 1;
const SLOT_FINAL: u8 = 2;
const HKDF_SALT: &[u8] = b"swarmserve/v1 onion hop";
const HKDF_INFO: &[u8] = b"swarmserve/v1 onion keys";
const OKM_SIZE: usize = 4 * KEY_SIZE + HOP_SPAN;

/// What one hop derives from its shared secret.
struct HopSecrets {
    header: Key,
    forward: Key,
    backward: Key,
    replay_tag: [u8; 32],
    pad: [u8; HOP_SPAN],
}

impl Drop for HopSecrets {
    fn drop(&mut self) {
        self.header.zeroize();
        self.forward.zeroize();
        self.backward.zeroize();
        self.pad.zeroize();
    }
}

fn derive_hop_secrets(shared: &[u8; 32], ephemeral: &[u8; 32], onion_public: &[u8; 32]) -> HopSecrets {
    let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), shared);
    let mut info = [0u8; HKDF_INFO.len() + 64];
    info[..HKDF_INFO.len()].copy_from_slice(HKDF_INFO);
    info[HKDF_INFO.len()..HKDF_INFO.len() + 32].copy_from_slice(ephemeral);
    info[HKDF_INFO.len() + 32..].copy_from_slice(onion_public);
    let mut okm = Zeroizing::new([0u8; OKM_SIZE]);
    hk.expand(&info, okm.as_mut())
        .expect("OKM_SIZE is far below HKDF's 255 * 32 limit");
    let mut secrets = HopSecrets {
        header: *Key::from_slice(&okm[..32]),
        forward: *Key::from_slice(&okm[32..64]),
        backward: *Key::from_slice(&okm[64..96]),
        replay_tag: [0; 32],
        pad: [0; HOP_SPAN],
    };
    secrets.replay_tag.copy_from_slice(&okm[96..128]);
    secrets.pad.copy_from_slice(&okm[128..]);
    secrets
}

fn counter_nonce(counter: u64) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&counter.to_le_bytes());
    *Nonce::from_slice(&nonce)
}

/// ChaCha20-Poly1305's keystream for the set-up layer, `len` bytes from the start of the
/// message. Encrypting zeros yields exactly the keystream the AEAD will XOR into the
/// plaintext, so the filler lines up with the real encryption by construction.
fn header_keystream(key: &Key, len: usize) -> Vec<u8> {
    let mut stream = vec![0u8; len];
    ChaCha20Poly1305::new(key)
        .encrypt_in_place_detached(&counter_nonce(0), &[], &mut stream)
        .expect("set-up layers are far below the AEAD length limit");
    stream
}

fn write_slot(slot: &mut [u8], kind: u8, routing_info: &[u8]) {
    slot[0] = kind;
    slot[1] = routing_info.len() as u8;
    slot[2..2 + routing_info.len()].copy_from_slice(routing_info);
}

/// One hop of a circuit as the router sees it when building: the hop's onion public key and
/// the routing info that hop will learn (the next hop's address, or, for the last hop, any
/// instruction for the node that terminates the circuit).
pub struct HopSpec<'a> {
    pub onion_key: [u8; 32],
    pub routing_info: &'a [u8],
}

/// The router's side of a circuit: every hop's data keys and the two counters.
pub struct Circuit {
    forward: Vec<ChaCha20Poly1305>,
    backward: Vec<ChaCha20Poly1305>,
    forward_counter: u64,
    backward_counter: u64,
    closed: bool,
}

impl Circuit {
    /// Builds the set-up onion for `hops` (the last one terminates the circuit and receives
    /// `payload`). Returns the cell to send to hop 0 and the circuit state.
    pub fn build(hops: &[HopSpec<'_>], payload: &[u8]) -> Result<(Vec<u8>, Circuit)> {
        let layers = hops.len();
        if layers == 0 || layers > MAX_LAYERS {
            return Err(Error::InvalidArgument(format!(
                "a circuit has 1 to {MAX_LAYERS} layers, got {layers}"
            )));
        }
        if payload.len() > SETUP_PAYLOAD_MAX {
            return Err(Error::InvalidArgument(format!(
                "set-up payload is {} bytes; at most {SETUP_PAYLOAD_MAX} fit",
                payload.len()
            )));
        }
        for (index, hop) in hops.iter().enumerate() {
            if hop.routing_info.len() > ROUTING_INFO_MAX {
                return Err(Error::InvalidArgument(format!(
                    "routing info for hop {index} is {} bytes; at most {ROUTING_INFO_MAX} fit",
                    hop.routing_info.len()
                )));
            }
        }

        let mut ephemerals = Vec::with_capacity(layers);
        let mut secrets = Vec::with_capacity(layers);
        for (index, hop) in hops.iter().enumerate() {
            let ephemeral = EphemeralSecret::random_from_rng(OsRng);
            let ephemeral_public = PublicKey::from(&ephemeral).to_bytes();
            let shared = ephemeral.diffie_hellman(&PublicKey::from(hop.onion_key));
            if !shared.was_contributory() {
                return Err(Error::InvalidKey(format!(
                    "onion key of hop {index} is a low-order point"
                )));
            }
            secrets.push(derive_hop_secrets(shared.as_bytes(), &ephemeral_public, &hop.onion_key));
            ephemerals.push(ephemeral_public);
        }

        // filler = the tail of the cell that hop j+1 receives, forced by the pads of hops 0..=j.
        let mut filler: Vec<u8> = Vec::with_capacity((layers - 1) * HOP_SPAN);
        for secret in secrets.iter().take(layers - 1) {
            let stream = header_keystream(&secret.header, SETUP_CT_SIZE);
            let offset = SETUP_CT_SIZE - filler.len();
            for (byte, key) in filler.iter_mut().zip(&stream[offset..]) {
                *byte ^= key;
            }
            filler.extend_from_slice(&secret.pad);
        }

        // The last hop's plaintext: final slot, payload, zeros, then whatever makes its
        // ciphertext tail equal the filler the relays before it will have appended.
        let last = layers - 1;
        let mut plaintext = vec![0u8; SETUP_CT_SIZE];
        write_slot(&mut plaintext[..ROUTING_SLOT_SIZE], SLOT_FINAL, hops[last].routing_info);
        let body = &mut plaintext[ROUTING_SLOT_SIZE..];
        body[..2].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        body[2..2 + payload.len()].copy_from_slice(payload);
        let tail_start = SETUP_CT_SIZE - filler.len();
        let stream = header_keystream(&secrets[last].header, SETUP_CT_SIZE);
        for (i, byte) in filler.iter().enumerate() {
            plaintext[tail_start + i] = byte ^ stream[tail_start + i];
        }
        let mut cell = seal_setup_layer(&secrets[last], &ephemerals[last], plaintext);

        for j in (0..last).rev() {
            let mut plaintext = vec![0u8; SETUP_CT_SIZE];
            write_slot(&mut plaintext[..ROUTING_SLOT_SIZE], SLOT_FORWARD, hops[j].routing_info);
            plaintext[ROUTING_SLOT_SIZE..].copy_from_slice(&cell[..SETUP_CELL_SIZE - HOP_SPAN]);
            debug_assert_eq!(&cell[SETUP_CELL_SIZE - HOP_SPAN..], &secrets[j].pad[..]);
            cell = seal_setup_layer(&secrets[j], &ephemerals[j], plaintext);
        }

        let circuit = Circuit {
            forward: secrets.iter().map(|s| ChaCha20Poly1305::new(&s.forward)).collect(),
            backward: secrets.iter().map(|s| ChaCha20Poly1305::new(&s.backward)).collect(),
            forward_counter: 0,
            backward_counter: 0,
            closed: false,
        };
        Ok((cell, circuit))
    }

    pub fn layers(&self) -> usize {
        self.forward.len()
    }

    /// Length of a forward cell carrying `plaintext_len` bytes.
    pub fn forward_cell_len(&self, plaintext_len: usize) -> usize {
        plaintext_len + TAG_SIZE * self.forward.len()
    }

    /// Seals a forward data cell once per hop, the last hop's layer innermost.
    pub fn wrap_forward(&mut self, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut cell = vec![0u8; self.forward_cell_len(plaintext.len())];
        self.wrap_forward_into(plaintext, &mut cell)?;
        Ok(cell)
    }

    /// [`Self::wrap_forward`] into `out`, which must be `forward_cell_len(plaintext.len())`
    /// bytes (the bindings pass the final Python buffer: no intermediate allocation).
    pub fn wrap_forward_into(&mut self, plaintext: &[u8], out: &mut [u8]) -> Result<()> {
        if self.closed {
            return Err(Error::CircuitClosed);
        }
        assert_eq!(out.len(), self.forward_cell_len(plaintext.len()), "output buffer size");
        let nonce = counter_nonce(self.forward_counter);
        out[..plaintext.len()].copy_from_slice(plaintext);
        let mut sealed = plaintext.len();
        for cipher in self.forward.iter().rev() {
            sealed = seal_detached(cipher, &nonce, out, sealed)?;
        }
        self.forward_counter += 1;
        Ok(())
    }

    /// Strips every hop's backward layer from a response cell, hop 0's first.
    pub fn unwrap_backward(&mut self, cell: &[u8]) -> Result<Vec<u8>> {
        let mut buffer = cell.to_vec();
        let len = self.unwrap_backward_in_place(&mut buffer)?;
        buffer.truncate(len);
        Ok(buffer)
    }

    /// [`Self::unwrap_backward`] in place: `buffer` holds the cell; returns the plaintext
    /// length (the plaintext is `buffer[..len]`).
    pub fn unwrap_backward_in_place(&mut self, buffer: &mut [u8]) -> Result<usize> {
        if self.closed {
            return Err(Error::CircuitClosed);
        }
        let layers = self.backward.len();
        if buffer.len() < TAG_SIZE * layers {
            self.closed = true;
            return Err(Error::Malformed {
                what: "backward cell",
                detail: format!(
                    "{} bytes cannot hold {layers} layers of {TAG_SIZE}-byte tags",
                    buffer.len()
                ),
            });
        }
        let nonce = counter_nonce(self.backward_counter);
        let mut len = buffer.len();
        for cipher in &self.backward {
            match open_detached(cipher, &nonce, &mut buffer[..len], "backward cell") {
                Ok(opened) => len = opened,
                Err(error) => {
                    self.closed = true;
                    return Err(error);
                }
            }
        }
        self.backward_counter += 1;
        Ok(len)
    }
}

/// Seals `buffer[..len]` in place and writes the tag after it; returns the new length.
fn seal_detached(cipher: &ChaCha20Poly1305, nonce: &Nonce, buffer: &mut [u8], len: usize) -> Result<usize> {
    let tag = cipher
        .encrypt_in_place_detached(nonce, &[], &mut buffer[..len])
        .map_err(|_| Error::InvalidArgument("cell too long for ChaCha20-Poly1305".into()))?;
    buffer[len..len + TAG_SIZE].copy_from_slice(&tag);
    Ok(len + TAG_SIZE)
}

/// Opens `buffer` (ciphertext then tag) in place; returns the plaintext length.
fn open_detached(cipher: &ChaCha20Poly1305, nonce: &Nonce, buffer: &mut [u8], what: &'static str) -> Result<usize> {
    let len = buffer.len() - TAG_SIZE;
    let (ciphertext, tag) = buffer.split_at_mut(len);
    cipher
        .decrypt_in_place_detached(nonce, &[], ciphertext, Tag::from_slice(tag))
        .map_err(|_| Error::Authentication { what })?;
    Ok(len)
}

fn seal_setup_layer(secrets: &HopSecrets, ephemeral: &[u8; 32], mut plaintext: Vec<u8>) -> Vec<u8> {
    let tag = ChaCha20Poly1305::new(&secrets.header)
        .encrypt_in_place_detached(&counter_nonce(0), &[], &mut plaintext)
        .expect("set-up layers are far below the AEAD length limit");
    let mut cell = Vec::with_capacity(SETUP_CELL_SIZE);
    cell.extend_from_slice(ephemeral);
    cell.extend_from_slice(&tag);
    cell.extend_from_slice(&plaintext);
    cell
}

/// One hop's side of a circuit: a relay, or the node that terminates the circuit.
pub struct CircuitHop {
    forward: ChaCha20Poly1305,
    backward: ChaCha20Poly1305,
    forward_counter: u64,
    backward_counter: u64,
    closed: bool,
}

impl CircuitHop {
    /// Removes this hop's layer from a forward cell.
    pub fn peel_forward(&mut self, cell: &[u8]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; cell.len().saturating_sub(TAG_SIZE)];
        self.peel_forward_into(cell, &mut out)?;
        Ok(out)
    }

    /// [`Self::peel_forward`] into `out`, which must be `cell.len() - TAG_SIZE` bytes.
    pub fn peel_forward_into(&mut self, cell: &[u8], out: &mut [u8]) -> Result<()> {
        if self.closed {
            return Err(Error::CircuitClosed);
        }
        if cell.len() < TAG_SIZE {
            self.closed = true;
            return Err(Error::Malformed {
                what: "forward cell",
                detail: format!("{} bytes is shorter than one {TAG_SIZE}-byte tag", cell.len()),
            });
        }
        let (ciphertext, tag) = cell.split_at(cell.len() - TAG_SIZE);
        assert_eq!(out.len(), ciphertext.len(), "output buffer size");
        out.copy_from_slice(ciphertext);
        let nonce = counter_nonce(self.forward_counter);
        if self
            .forward
            .decrypt_in_place_detached(&nonce, &[], out, Tag::from_slice(tag))
            .is_err()
        {
            self.closed = true;
            return Err(Error::Authentication { what: "forward cell" });
        }
        self.forward_counter += 1;
        Ok(())
    }

    /// Adds this hop's layer to a backward cell.
    pub fn wrap_backward(&mut self, cell: &[u8]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; cell.len() + TAG_SIZE];
        self.wrap_backward_into(cell, &mut out)?;
        Ok(out)
    }

    /// [`Self::wrap_backward`] into `out`, which must be `cell.len() + TAG_SIZE` bytes.
    pub fn wrap_backward_into(&mut self, cell: &[u8], out: &mut [u8]) -> Result<()> {
        if self.closed {
            return Err(Error::CircuitClosed);
        }
        assert_eq!(out.len(), cell.len() + TAG_SIZE, "output buffer size");
        out[..cell.len()].copy_from_slice(cell);
        seal_detached(&self.backward, &counter_nonce(self.backward_counter), out, cell.len())?;
        self.backward_counter += 1;
        Ok(())
    }
}

/// Where the peeled set-up goes next.
pub enum SetupNext {
    /// Send `cell` (again exactly [`SETUP_CELL_SIZE`] bytes) to the hop `routing_info` names.
    Forward { routing_info: Vec<u8>, cell: Vec<u8> },
    /// This hop terminates the circuit; `payload` is the router's message to it.
    Final { routing_info: Vec<u8>, payload: Vec<u8> },
}

/// The result of peeling one set-up layer.
pub struct PeeledSetup {
    pub next: SetupNext,
    pub hop: CircuitHop,
    pub replay_tag: [u8; 32],
}

impl OnionKey {
    /// Peels exactly one set-up layer. Nothing is remembered: the caller checks `replay_tag`
    /// against its [`ReplayCache`] once it accepts the set-up, so that set-ups it refuses
    /// (a next hop it will not dial, a limit reached) leave nothing behind to fill the cache.
    pub fn peel_setup(&self, cell: &[u8]) -> Result<PeeledSetup> {
        if cell.len() != SETUP_CELL_SIZE {
            return Err(Error::Malformed {
                what: "set-up cell",
                detail: format!("{} bytes, every set-up cell is {SETUP_CELL_SIZE}", cell.len()),
            });
        }
        let ephemeral: [u8; 32] = cell[..KEY_SIZE].try_into().expect("length checked above");
        let tag = Tag::from_slice(&cell[KEY_SIZE..LAYER_OVERHEAD]);
        let shared = self.secret.diffie_hellman(&PublicKey::from(ephemeral));
        if !shared.was_contributory() {
            return Err(Error::Authentication { what: "set-up cell" });
        }
        let secrets = derive_hop_secrets(shared.as_bytes(), &ephemeral, &self.public_key());
        let mut plaintext = cell[LAYER_OVERHEAD..].to_vec();
        ChaCha20Poly1305::new(&secrets.header)
            .decrypt_in_place_detached(&counter_nonce(0), &[], &mut plaintext, tag)
            .map_err(|_| Error::Authentication { what: "set-up cell" })?;

        let (kind, length) = (plaintext[0], plaintext[1] as usize);
        if length > ROUTING_INFO_MAX {
            return Err(Error::Malformed {
                what: "set-up cell",
                detail: format!("routing info length {length}"),
            });
        }
        let routing_info = plaintext[2..2 + length].to_vec();
        let next = match kind {
            SLOT_FORWARD => {
                let mut next_cell = Vec::with_capacity(SETUP_CELL_SIZE);
                next_cell.extend_from_slice(&plaintext[ROUTING_SLOT_SIZE..]);
                next_cell.extend_from_slice(&secrets.pad);
                SetupNext::Forward {
                    routing_info,
                    cell: next_cell,
                }
            }
            SLOT_FINAL => {
                let body = &plaintext[ROUTING_SLOT_SIZE..];
                let size = u16::from_be_bytes([body[0], body[1]]) as usize;
                if size > SETUP_PAYLOAD_MAX {
                    return Err(Error::Malformed {
                        what: "set-up cell",
                        detail: format!("payload length {size}"),
                    });
                }
                SetupNext::Final {
                    routing_info,
                    payload: body[2..2 + size].to_vec(),
                }
            }
            other => {
                return Err(Error::Malformed {
                    what: "set-up cell",
                    detail: format!("unknown slot kind {other}"),
                });
            }
        };
        Ok(PeeledSetup {
            next,
            hop: CircuitHop {
                forward: ChaCha20Poly1305::new(&secrets.forward),
                backward: ChaCha20Poly1305::new(&secrets.backward),
                forward_counter: 0,
                backward_counter: 0,
                closed: false,
            },
            replay_tag: secrets.replay_tag,
        })
    }
}

/// Replay tags of accepted set-ups, each kept for `ttl` (set it to at least the onion key's
/// lifetime: once the key rotates, old set-ups no longer decrypt). Bounded: when it is full of
/// unexpired tags, new set-ups are refused rather than a tag forgotten.
pub struct ReplayCache {
    ttl: Duration,
    capacity: usize,
    seen: HashSet<[u8; 32]>,
    expiry: VecDeque<(Instant, [u8; 32])>,
}

impl ReplayCache {
    pub fn new(capacity: usize, ttl: Duration) -> Result<Self> {
        if capacity == 0 {
            return Err(Error::InvalidArgument(
                "replay cache capacity must be at least 1".into(),
            ));
        }
        Ok(Self {
            ttl,
            capacity,
            seen: HashSet::new(),
            expiry: VecDeque::new(),
        })
    }

    pub fn check_and_remember(&mut self, tag: [u8; 32]) -> Result<()> {
        self.check_and_remember_at(tag, Instant::now())
    }

    /// Same as [`Self::check_and_remember`] at a given time (tests drive the clock).
    pub fn check_and_remember_at(&mut self, tag: [u8; 32], now: Instant) -> Result<()> {
        self.expire(now);
        if self.seen.contains(&tag) {
            return Err(Error::Replay);
        }
        if self.seen.len() >= self.capacity {
            return Err(Error::ReplayCacheFull {
                capacity: self.capacity,
            });
        }
        self.seen.insert(tag);
        self.expiry.push_back((now + self.ttl, tag));
        Ok(())
    }

    fn expire(&mut self, now: Instant) {
        // Every entry has the same ttl, so the queue is in expiry order.
        while let Some((deadline, tag)) = self.expiry.front() {
            if *deadline > now {
                break;
            }
            self.seen.remove(tag);
            self.expiry.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relays(n: usize) -> Vec<OnionKey> {
        (0..n).map(|_| OnionKey::generate()).collect()
    }

    /// Builds and fully peels an `n`-layer circuit; returns the router side and the hops.
    fn establish(keys: &[OnionKey], payload: &[u8]) -> (Circuit, Vec<CircuitHop>) {
        let routing: Vec<Vec<u8>> = (0..keys.len()).map(|i| format!("hop-{i}").into_bytes()).collect();
        let specs: Vec<HopSpec> = keys
            .iter()
            .zip(&routing)
            .map(|(k, r)| HopSpec {
                onion_key: k.public_key(),
                routing_info: r,
            })
            .collect();
        let (mut cell, circuit) = Circuit::build(&specs, payload).unwrap();
        let mut hops = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(cell.len(), SETUP_CELL_SIZE, "every hop sees the same size");
            let peeled = key.peel_setup(&cell).unwrap();
            hops.push(peeled.hop);
            match peeled.next {
                SetupNext::Forward {
                    routing_info,
                    cell: next,
                } => {
                    assert!(i + 1 < keys.len());
                    assert_eq!(routing_info, routing[i]);
                    cell = next;
                }
                SetupNext::Final {
                    routing_info,
                    payload: got,
                } => {
                    assert_eq!(i + 1, keys.len());
                    assert_eq!(routing_info, routing[i]);
                    assert_eq!(got, payload);
                }
            }
        }
        (circuit, hops)
    }

    #[test]
    fn every_path_length_delivers_payload_and_data() {
        for layers in 1..=MAX_LAYERS {
            let keys = relays(layers);
            let payload = vec![0xAB; SETUP_PAYLOAD_MAX];
            let (mut circuit, mut hops) = establish(&keys, &payload);
            for round in 0..3u8 {
                let mut cell = circuit.wrap_forward(&[round; 40]).unwrap();
                for hop in hops.iter_mut() {
                    cell = hop.peel_forward(&cell).unwrap();
                }
                assert_eq!(cell, vec![round; 40]);
                let mut back = vec![round ^ 0xFF; 33];
                for hop in hops.iter_mut().rev() {
                    back = hop.wrap_backward(&back).unwrap();
                }
                assert_eq!(circuit.unwrap_backward(&back).unwrap(), vec![round ^ 0xFF; 33]);
            }
        }
    }

    #[test]
    fn any_flipped_setup_byte_is_rejected_by_the_first_hop() {
        let keys = relays(3);
        let specs: Vec<HopSpec> = keys
            .iter()
            .map(|k| HopSpec {
                onion_key: k.public_key(),
                routing_info: b"x",
            })
            .collect();
        let (cell, _) = Circuit::build(&specs, b"p").unwrap();
        for position in (0..SETUP_CELL_SIZE).step_by(61) {
            let mut bad = cell.clone();
            bad[position] ^= 0x01;
            let err = keys[0].peel_setup(&bad).err().expect("tampering must be caught");
            assert!(matches!(err, Error::Authentication { .. }), "byte {position}: {err}");
        }
    }

    #[test]
    fn replayed_setup_is_refused() {
        let key = OnionKey::generate();
        let (cell, _) = Circuit::build(
            &[HopSpec {
                onion_key: key.public_key(),
                routing_info: b"",
            }],
            b"",
        )
        .unwrap();
        let mut replay = ReplayCache::new(1024, Duration::from_secs(600)).unwrap();
        let tag = key.peel_setup(&cell).unwrap().replay_tag;
        replay.check_and_remember(tag).unwrap();
        // The same cell peels to the same tag: the cache refuses it.
        let again = key.peel_setup(&cell).unwrap().replay_tag;
        assert_eq!(replay.check_and_remember(again), Err(Error::Replay));
    }

    #[test]
    fn replay_cache_expires_and_bounds() {
        let mut c = ReplayCache::new(2, Duration::from_secs(10)).unwrap();
        let t0 = Instant::now();
        c.check_and_remember_at([1; 32], t0).unwrap();
        c.check_and_remember_at([2; 32], t0).unwrap();
        assert_eq!(
            c.check_and_remember_at([3; 32], t0),
            Err(Error::ReplayCacheFull { capacity: 2 })
        );
        assert_eq!(
            c.check_and_remember_at([1; 32], t0 + Duration::from_secs(9)),
            Err(Error::Replay)
        );
        c.check_and_remember_at([3; 32], t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn wrong_key_and_wrong_size_are_rejected() {
        let key = OnionKey::generate();
        let (cell, _) = Circuit::build(
            &[HopSpec {
                onion_key: key.public_key(),
                routing_info: b"",
            }],
            b"",
        )
        .unwrap();
        assert!(matches!(
            OnionKey::generate().peel_setup(&cell),
            Err(Error::Authentication { .. })
        ));
        assert!(matches!(key.peel_setup(&cell[..100]), Err(Error::Malformed { .. })));
    }

    #[test]
    fn tampered_data_cell_closes_the_circuit() {
        let keys = relays(3);
        let (mut circuit, mut hops) = establish(&keys, b"");
        let mut cell = circuit.wrap_forward(b"token").unwrap();
        cell[3] ^= 0x80;
        assert!(matches!(hops[0].peel_forward(&cell), Err(Error::Authentication { .. })));
        assert_eq!(hops[0].peel_forward(&cell).err(), Some(Error::CircuitClosed));
        // Backward: two cells delivered to the router in the wrong order fail authentication.
        let (mut circuit, mut hops) = establish(&keys, b"");
        let backward = |hops: &mut Vec<CircuitHop>, text: &[u8]| {
            hops.iter_mut()
                .rev()
                .fold(text.to_vec(), |cell, hop| hop.wrap_backward(&cell).unwrap())
        };
        let _first = backward(&mut hops, b"a");
        let second = backward(&mut hops, b"b");
        assert!(matches!(
            circuit.unwrap_backward(&second),
            Err(Error::Authentication { .. })
        ));
        assert_eq!(circuit.unwrap_backward(&second).err(), Some(Error::CircuitClosed));
    }

    #[test]
    fn build_checks_its_arguments() {
        let key = OnionKey::generate().public_key();
        assert!(matches!(Circuit::build(&[], b""), Err(Error::InvalidArgument(_))));
        let long = vec![0; ROUTING_INFO_MAX + 1];
        assert!(matches!(
            Circuit::build(
                &[HopSpec {
                    onion_key: key,
                    routing_info: &long
                }],
                b""
            ),
            Err(Error::InvalidArgument(_))
        ));
        let big = vec![0; SETUP_PAYLOAD_MAX + 1];
        assert!(matches!(
            Circuit::build(
                &[HopSpec {
                    onion_key: key,
                    routing_info: b""
                }],
                &big
            ),
            Err(Error::InvalidArgument(_))
        ));
        // A low-order point (here: zero) gives an all-zero shared secret.
        assert!(matches!(
            Circuit::build(
                &[HopSpec {
                    onion_key: [0; 32],
                    routing_info: b""
                }],
                b""
            ),
            Err(Error::InvalidKey(_))
        ));
    }
}
