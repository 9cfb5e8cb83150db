//! Circuits multiplexed over links: the per-cell work of the data plane, with no I/O.
//!
//! A *link* is one long-lived stream between two neighbours that any number of circuits share
//! (Tor's channels). What travels on a link is *frames*, each a batch of cells of any of its
//! circuits, so that a busy link pays its transport's per-message cost once for many cells:
//!
//! ```text
//! frame = cell*
//! cell  = circuit id (u32 BE) | kind (u8) | reason (u8) | length (u32 BE) | payload
//! ```
//!
//! Kinds: CREATE (a set-up onion), CREATED (the set-up confirmation, one backward layer per hop),
//! DATA (an onion-sealed cell), DESTROY (`reason`, a `relay.proto` `DestroyReason`). Circuit ids
//! are named by the side that sends the CREATE on that link; backward cells carry the same id.
//!
//! The [`Engine`] holds every circuit crossing this node and does, for each cell, what the
//! Python relay did per gRPC message: peel a forward layer or add a backward one and queue the
//! cell for the other link; deliver plaintexts to the circuit's owner at an end (the router that
//! originated it, the node that terminates it). The control plane (admission, limits, replay
//! tags, where the next hop is) stays with the caller: a CREATE becomes an [`Event::Setup`],
//! answered by [`Engine::extend`], [`Engine::terminate`] or [`Engine::refuse`].
//!
//! Invariants:
//! - a cell is only ever passed on after its layer authenticated; the first failure (or a cell
//!   of the wrong kind for the circuit's state) closes the circuit both ways with
//!   PROTOCOL_ERROR, and nothing of it is passed on;
//! - a DESTROY (or a lost link) closes the circuit on both of its links: the other side is told
//!   with the same reason (HOP_UNREACHABLE for a lost link), the owner with an [`Event::Closed`];
//! - cells of one circuit leave in the order they came; each frame a caller takes holds whole
//!   cells, at most `max_frame_bytes` of them unless one cell alone is larger;
//! - a malformed frame is refused whole (the caller drops the link): nothing after the first bad
//!   byte is parsed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::onion::{Circuit, CircuitHop};

pub type LinkId = u64;
pub type CircuitId = u32;
/// What the owner of a circuit end calls it (the caller's number, not on any wire).
pub type Handle = u64;

const HEADER: usize = 4 + 1 + 1 + 4;
/// What a node that terminates a circuit sends back, sealed, to confirm the set-up.
pub const CIRCUIT_READY: &[u8] = b"swarmserve/v1 circuit ready";

pub const DESTROY_FINISHED: u8 = 1;
pub const DESTROY_PROTOCOL_ERROR: u8 = 2;
pub const DESTROY_HOP_UNREACHABLE: u8 = 3;
pub const DESTROY_TIMEOUT: u8 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Create = 1,
    Created = 2,
    Data = 3,
    Destroy = 4,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Kind> {
        match value {
            1 => Some(Kind::Create),
            2 => Some(Kind::Created),
            3 => Some(Kind::Data),
            4 => Some(Kind::Destroy),
            _ => None,
        }
    }
}

/// One cell, parsed.
#[derive(Debug, PartialEq, Eq)]
pub struct Cell<'a> {
    pub circuit: CircuitId,
    pub kind: Kind,
    pub reason: u8,
    pub payload: &'a [u8],
}

/// Appends one cell to a frame.
pub fn encode_cell(frame: &mut Vec<u8>, circuit: CircuitId, kind: Kind, reason: u8, payload: &[u8]) {
    frame.extend_from_slice(&circuit.to_be_bytes());
    frame.push(kind as u8);
    frame.push(reason);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
}

/// The cells of a frame; a truncated cell, an unknown kind or a cell longer than
/// `max_cell_bytes` makes the whole frame malformed.
pub fn decode_frame(frame: &[u8], max_cell_bytes: usize) -> Result<Vec<Cell<'_>>> {
    let mut cells = Vec::new();
    let mut rest = frame;
    while !rest.is_empty() {
        let malformed = |detail: String| Error::Malformed {
            what: "link frame",
            detail,
        };
        if rest.len() < HEADER {
            return Err(malformed(format!(
                "{} bytes left, a cell header is {HEADER}",
                rest.len()
            )));
        }
        let circuit = u32::from_be_bytes(rest[0..4].try_into().expect("4 bytes"));
        let kind = Kind::from_u8(rest[4]).ok_or_else(|| malformed(format!("unknown cell kind {}", rest[4])))?;
        let reason = rest[5];
        let length = u32::from_be_bytes(rest[6..10].try_into().expect("4 bytes")) as usize;
        if length > max_cell_bytes {
            return Err(malformed(format!("a cell of {length} bytes; at most {max_cell_bytes}")));
        }
        if rest.len() < HEADER + length {
            return Err(malformed(format!(
                "a cell of {length} bytes, {} left",
                rest.len() - HEADER
            )));
        }
        cells.push(Cell {
            circuit,
            kind,
            reason,
            payload: &rest[HEADER..HEADER + length],
        });
        rest = &rest[HEADER + length..];
    }
    Ok(cells)
}

/// What the caller must act on, in the order it happened.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A set-up arrived on `link` for circuit `circuit`: decide with extend/terminate/refuse.
    Setup {
        link: LinkId,
        circuit: CircuitId,
        onion: Vec<u8>,
    },
    /// An originated circuit's set-up was confirmed end to end.
    Opened { handle: Handle },
    /// A plaintext for the owner of a circuit end (the request at an exit, an answer at the origin).
    Message { handle: Handle, plaintext: Vec<u8> },
    /// A circuit that has an owner is gone (`reason`: a DestroyReason).
    Closed { handle: Handle, reason: u8 },
    /// A relayed circuit (no owner here) is gone; its set-up's admission may be released.
    Released {
        link: LinkId,
        circuit: CircuitId,
        reason: u8,
    },
}

enum Slot {
    /// A CREATE awaiting the control plane's decision.
    Pending,
    /// The side of a relayed circuit towards the origin; it holds the hop's keys.
    Inbound {
        hop: CircuitHop,
        out: (LinkId, CircuitId),
        confirmed: bool,
    },
    /// The side of a relayed circuit towards the exit.
    Outbound { back: (LinkId, CircuitId) },
    /// This node terminates the circuit.
    Exit { hop: CircuitHop, handle: Handle },
    /// This node originated the circuit.
    Origin {
        circuit: Circuit,
        handle: Handle,
        confirmed: bool,
    },
}

struct Entry {
    slot: Slot,
    last_active: Instant,
}

/// Counters of what was passed on (read by the caller's metrics).
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    pub forward_cells: u64,
    pub backward_cells: u64,
    pub forward_bytes: u64,
    pub backward_bytes: u64,
}

pub struct Engine {
    circuits: HashMap<(LinkId, CircuitId), Entry>,
    by_handle: HashMap<Handle, (LinkId, CircuitId)>,
    next_id: HashMap<LinkId, CircuitId>,
    out: HashMap<LinkId, Vec<u8>>, // encoded cells waiting to leave, per link
    order: Vec<LinkId>,            // links with output, in the order they got it
    events: Vec<Event>,
    max_cell_bytes: usize,
    pub forwarded: Forwarded,
}

impl Engine {
    pub fn new(max_cell_bytes: usize) -> Self {
        Engine {
            circuits: HashMap::new(),
            by_handle: HashMap::new(),
            next_id: HashMap::new(),
            out: HashMap::new(),
            order: Vec::new(),
            events: Vec::new(),
            max_cell_bytes,
            forwarded: Forwarded::default(),
        }
    }

    pub fn circuits(&self) -> usize {
        self.circuits.len()
    }

    fn emit(&mut self, link: LinkId, circuit: CircuitId, kind: Kind, reason: u8, payload: &[u8]) {
        let buffer = self.out.entry(link).or_default();
        if buffer.is_empty() {
            self.order.push(link);
        }
        encode_cell(buffer, circuit, kind, reason, payload);
    }

    fn new_id(&mut self, link: LinkId) -> CircuitId {
        let next = self.next_id.entry(link).or_insert(1);
        let mut id = *next;
        while self.circuits.contains_key(&(link, id)) || id == 0 {
            id = id.wrapping_add(1);
        }
        *next = id.wrapping_add(1);
        id
    }

    /// Processes one frame that arrived on `link`. Err: the frame is malformed; nothing of it
    /// was processed, and the caller should drop the link ([`Engine::link_lost`]).
    pub fn receive(&mut self, link: LinkId, frame: &[u8], now: Instant) -> Result<()> {
        let cells = decode_frame(frame, self.max_cell_bytes)?;
        for cell in cells {
            self.cell(link, cell, now);
        }
        Ok(())
    }

    fn cell(&mut self, link: LinkId, cell: Cell<'_>, now: Instant) {
        let key = (link, cell.circuit);
        let Some(entry) = self.circuits.get_mut(&key) else {
            match cell.kind {
                Kind::Create => {
                    self.circuits.insert(
                        key,
                        Entry {
                            slot: Slot::Pending,
                            last_active: now,
                        },
                    );
                    self.events.push(Event::Setup {
                        link,
                        circuit: cell.circuit,
                        onion: cell.payload.to_vec(),
                    });
                }
                Kind::Destroy => {} // for a circuit already gone: nothing to do
                _ => self.emit(link, cell.circuit, Kind::Destroy, DESTROY_PROTOCOL_ERROR, &[]),
            }
            return;
        };
        entry.last_active = now;
        match (&mut entry.slot, cell.kind) {
            (_, Kind::Destroy) => self.close(key, cell.reason, false),
            (
                Slot::Inbound {
                    hop,
                    out,
                    confirmed: true,
                },
                Kind::Data,
            ) => match hop.peel_forward(cell.payload) {
                Ok(peeled) => {
                    let out = *out;
                    self.forwarded.forward_cells += 1;
                    self.forwarded.forward_bytes += peeled.len() as u64;
                    if let Some(other) = self.circuits.get_mut(&out) {
                        other.last_active = now;
                    }
                    self.emit(out.0, out.1, Kind::Data, 0, &peeled);
                }
                Err(_) => self.close(key, DESTROY_PROTOCOL_ERROR, true),
            },
            (Slot::Outbound { back }, kind @ (Kind::Created | Kind::Data)) => {
                let back = *back;
                let Some(Entry {
                    slot: Slot::Inbound { hop, confirmed, .. },
                    last_active,
                }) = self.circuits.get_mut(&back)
                else {
                    return self.close(key, DESTROY_PROTOCOL_ERROR, true);
                };
                *last_active = now;
                if (kind == Kind::Created) == *confirmed {
                    // CREATED twice, or DATA before CREATED
                    return self.close(key, DESTROY_PROTOCOL_ERROR, true);
                }
                match hop.wrap_backward(cell.payload) {
                    Ok(wrapped) => {
                        *confirmed = true;
                        if kind == Kind::Data {
                            self.forwarded.backward_cells += 1;
                            self.forwarded.backward_bytes += cell.payload.len() as u64;
                        }
                        self.emit(back.0, back.1, kind, 0, &wrapped);
                    }
                    Err(_) => self.close(key, DESTROY_PROTOCOL_ERROR, true),
                }
            }
            (Slot::Exit { hop, handle }, Kind::Data) => match hop.peel_forward(cell.payload) {
                Ok(plaintext) => {
                    let handle = *handle;
                    self.events.push(Event::Message { handle, plaintext });
                }
                Err(_) => self.close(key, DESTROY_PROTOCOL_ERROR, true),
            },
            (
                Slot::Origin {
                    circuit,
                    handle,
                    confirmed,
                },
                kind @ (Kind::Created | Kind::Data),
            ) => {
                let handle = *handle;
                if (kind == Kind::Created) == *confirmed {
                    return self.close(key, DESTROY_PROTOCOL_ERROR, true);
                }
                match circuit.unwrap_backward(cell.payload) {
                    Ok(plaintext) if kind == Kind::Data => self.events.push(Event::Message { handle, plaintext }),
                    Ok(plaintext) if plaintext == CIRCUIT_READY => {
                        *confirmed = true;
                        self.events.push(Event::Opened { handle });
                    }
                    _ => self.close(key, DESTROY_PROTOCOL_ERROR, true),
                }
            }
            _ => self.close(key, DESTROY_PROTOCOL_ERROR, true),
        }
    }

    /// Closes the circuit at `key` and its other side here. `tell_sender`: also send DESTROY
    /// back on `key`'s own link (the failure was found here, not announced by that side).
    fn close(&mut self, key: (LinkId, CircuitId), reason: u8, tell_sender: bool) {
        let Some(entry) = self.circuits.remove(&key) else {
            return;
        };
        if tell_sender {
            self.emit(key.0, key.1, Kind::Destroy, reason, &[]);
        }
        let (other, inbound) = match entry.slot {
            Slot::Inbound { out, .. } => (Some(out), key),
            Slot::Outbound { back } => (Some(back), back),
            Slot::Exit { handle, .. } | Slot::Origin { handle, .. } => {
                self.by_handle.remove(&handle);
                self.events.push(Event::Closed { handle, reason });
                (None, key)
            }
            Slot::Pending => (None, key),
        };
        if let Some(other) = other {
            if self.circuits.remove(&other).is_some() {
                self.emit(other.0, other.1, Kind::Destroy, reason, &[]);
            }
        }
        if !matches!(entry.slot, Slot::Origin { .. }) {
            // a set-up this node admitted (or was deciding on) is over
            self.events.push(Event::Released {
                link: inbound.0,
                circuit: inbound.1,
                reason,
            });
        }
    }

    fn pending(&mut self, link: LinkId, circuit: CircuitId) -> Result<()> {
        match self.circuits.get(&(link, circuit)) {
            Some(Entry {
                slot: Slot::Pending, ..
            }) => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "no set-up is waiting on link {link}, circuit {circuit}"
            ))),
        }
    }

    /// Passes a set-up on: `hop` (this node's keys for the circuit) and `next_cell` (the rest
    /// of the onion) go to a new circuit on `out_link`. Its CREATED comes back wrapped.
    pub fn extend(
        &mut self,
        link: LinkId,
        circuit: CircuitId,
        hop: CircuitHop,
        out_link: LinkId,
        next_cell: &[u8],
        now: Instant,
    ) -> Result<()> {
        self.pending(link, circuit)?;
        let out_id = self.new_id(out_link);
        self.circuits.insert(
            (link, circuit),
            Entry {
                slot: Slot::Inbound {
                    hop,
                    out: (out_link, out_id),
                    confirmed: false,
                },
                last_active: now,
            },
        );
        self.circuits.insert(
            (out_link, out_id),
            Entry {
                slot: Slot::Outbound { back: (link, circuit) },
                last_active: now,
            },
        );
        self.emit(out_link, out_id, Kind::Create, 0, next_cell);
        Ok(())
    }

    /// Terminates a set-up here: confirms it and delivers its plaintexts as `handle`'s.
    pub fn terminate(
        &mut self,
        link: LinkId,
        circuit: CircuitId,
        mut hop: CircuitHop,
        handle: Handle,
        now: Instant,
    ) -> Result<()> {
        self.pending(link, circuit)?;
        if self.by_handle.contains_key(&handle) {
            return Err(Error::InvalidArgument(format!("handle {handle} is in use")));
        }
        let confirmation = hop.wrap_backward(CIRCUIT_READY)?;
        self.circuits.insert(
            (link, circuit),
            Entry {
                slot: Slot::Exit { hop, handle },
                last_active: now,
            },
        );
        self.by_handle.insert(handle, (link, circuit));
        self.emit(link, circuit, Kind::Created, 0, &confirmation);
        Ok(())
    }

    /// Refuses a set-up with `reason` (a DestroyReason).
    pub fn refuse(&mut self, link: LinkId, circuit: CircuitId, reason: u8) -> Result<()> {
        self.pending(link, circuit)?;
        self.circuits.remove(&(link, circuit));
        self.emit(link, circuit, Kind::Destroy, reason, &[]);
        Ok(())
    }

    /// Starts a circuit from here over `link` with the set-up `onion` built with `circuit`;
    /// [`Event::Opened`] says when it is confirmed.
    pub fn originate(
        &mut self,
        link: LinkId,
        circuit: Circuit,
        onion: &[u8],
        handle: Handle,
        now: Instant,
    ) -> Result<()> {
        if self.by_handle.contains_key(&handle) {
            return Err(Error::InvalidArgument(format!("handle {handle} is in use")));
        }
        let id = self.new_id(link);
        self.circuits.insert(
            (link, id),
            Entry {
                slot: Slot::Origin {
                    circuit,
                    handle,
                    confirmed: false,
                },
                last_active: now,
            },
        );
        self.by_handle.insert(handle, (link, id));
        self.emit(link, id, Kind::Create, 0, onion);
        Ok(())
    }

    /// Sends `plaintext` on `handle`'s circuit: sealed for every hop at the origin, with this
    /// hop's backward layer at an exit.
    pub fn send(&mut self, handle: Handle, plaintext: &[u8], now: Instant) -> Result<()> {
        let key = *self.by_handle.get(&handle).ok_or(Error::CircuitClosed)?;
        let entry = self.circuits.get_mut(&key).expect("handles name live circuits");
        entry.last_active = now;
        let sealed = match &mut entry.slot {
            Slot::Origin {
                circuit,
                confirmed: true,
                ..
            } => circuit.wrap_forward(plaintext),
            Slot::Exit { hop, .. } => hop.wrap_backward(plaintext),
            _ => return Err(Error::InvalidArgument(format!("circuit {handle} is not open yet"))),
        };
        match sealed {
            Ok(cell) => {
                self.emit(key.0, key.1, Kind::Data, 0, &cell);
                Ok(())
            }
            Err(error) => {
                self.close(key, DESTROY_PROTOCOL_ERROR, true);
                Err(error)
            }
        }
    }

    /// Closes `handle`'s circuit from this end (`reason`: FINISHED when done).
    pub fn close_handle(&mut self, handle: Handle, reason: u8) {
        if let Some(key) = self.by_handle.get(&handle).copied() {
            self.close(key, reason, true);
        }
    }

    /// `link` is gone: every circuit on it closes, the other sides told HOP_UNREACHABLE.
    pub fn link_lost(&mut self, link: LinkId) {
        let keys: Vec<_> = self.circuits.keys().filter(|(l, _)| *l == link).copied().collect();
        for key in keys {
            self.close(key, DESTROY_HOP_UNREACHABLE, false);
        }
        self.out.remove(&link);
        self.order.retain(|l| *l != link);
        self.next_id.remove(&link);
    }

    /// Closes circuits with no cell either way for `idle` (TIMEOUT, both sides told).
    pub fn expire(&mut self, now: Instant, idle: Duration) {
        let stale: Vec<_> = self
            .circuits
            .iter()
            .filter(|(_, e)| now.duration_since(e.last_active) >= idle)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            self.close(key, DESTROY_TIMEOUT, true);
        }
    }

    /// What happened since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Frames to send, one per link with output, in the order links got it; a link's frame
    /// holds whole cells, up to `max_frame_bytes` (more stays for the next call) unless its
    /// first cell alone is larger.
    pub fn take_frames(&mut self, max_frame_bytes: usize) -> Vec<(LinkId, Vec<u8>)> {
        let mut frames = Vec::with_capacity(self.order.len());
        let mut still = Vec::new();
        for link in std::mem::take(&mut self.order) {
            let Some(buffer) = self.out.get_mut(&link) else {
                continue;
            };
            let mut take = 0;
            while take < buffer.len() {
                let length = u32::from_be_bytes(buffer[take + 6..take + 10].try_into().expect("4 bytes")) as usize;
                if take > 0 && take + HEADER + length > max_frame_bytes {
                    break;
                }
                take += HEADER + length;
            }
            let rest = buffer.split_off(take);
            frames.push((link, std::mem::replace(buffer, rest)));
            if !buffer.is_empty() {
                still.push(link);
            }
        }
        self.order = still;
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::OnionKey;
    use crate::onion::{HopSpec, SetupNext};

    const MAX: usize = 1 << 16;

    /// A router, a relay and an exit, their links numbered as each sees them.
    struct Path {
        router: Engine,
        relay: Engine,
        exit: Engine,
        relay_key: OnionKey,
        exit_key: OnionKey,
        now: Instant,
    }

    const ROUTER_TO_RELAY: LinkId = 1; // at the router
    const RELAY_FROM_ROUTER: LinkId = 10; // at the relay
    const RELAY_TO_EXIT: LinkId = 11;
    const EXIT_FROM_RELAY: LinkId = 20; // at the exit

    impl Path {
        fn new() -> Self {
            Path {
                router: Engine::new(MAX),
                relay: Engine::new(MAX),
                exit: Engine::new(MAX),
                relay_key: OnionKey::generate(),
                exit_key: OnionKey::generate(),
                now: Instant::now(),
            }
        }

        /// Moves every frame to the engine at the other end of its link until none is left.
        fn pump(&mut self) {
            loop {
                let mut moved = false;
                for (link, frame) in self.router.take_frames(MAX) {
                    assert_eq!(link, ROUTER_TO_RELAY);
                    self.relay.receive(RELAY_FROM_ROUTER, &frame, self.now).unwrap();
                    moved = true;
                }
                for (link, frame) in self.relay.take_frames(MAX) {
                    let (engine, at) = if link == RELAY_FROM_ROUTER {
                        (&mut self.router, ROUTER_TO_RELAY)
                    } else {
                        (&mut self.exit, EXIT_FROM_RELAY)
                    };
                    engine.receive(at, &frame, self.now).unwrap();
                    moved = true;
                }
                for (link, frame) in self.exit.take_frames(MAX) {
                    assert_eq!(link, EXIT_FROM_RELAY);
                    self.relay.receive(RELAY_TO_EXIT, &frame, self.now).unwrap();
                    moved = true;
                }
                if !moved {
                    return;
                }
            }
        }

        /// Opens circuit `handle` router -> relay -> exit, the control planes admitting it.
        fn open(&mut self, handle: Handle) {
            let specs = [
                HopSpec {
                    onion_key: self.relay_key.public_key(),
                    routing_info: b"exit",
                },
                HopSpec {
                    onion_key: self.exit_key.public_key(),
                    routing_info: b"",
                },
            ];
            let (onion, circuit) = Circuit::build(&specs, b"").unwrap();
            self.router
                .originate(ROUTER_TO_RELAY, circuit, &onion, handle, self.now)
                .unwrap();
            self.pump();
            let Some(Event::Setup { link, circuit, onion }) = self.relay.take_events().pop() else {
                panic!()
            };
            let peeled = self.relay_key.peel_setup(&onion).unwrap();
            let SetupNext::Forward { cell, .. } = peeled.next else {
                panic!()
            };
            self.relay
                .extend(link, circuit, peeled.hop, RELAY_TO_EXIT, &cell, self.now)
                .unwrap();
            self.pump();
            let Some(Event::Setup { link, circuit, onion }) = self.exit.take_events().pop() else {
                panic!()
            };
            let peeled = self.exit_key.peel_setup(&onion).unwrap();
            self.exit
                .terminate(link, circuit, peeled.hop, handle + 1000, self.now)
                .unwrap();
            self.pump();
            assert_eq!(self.router.take_events(), vec![Event::Opened { handle }]);
        }
    }

    fn closed(handle: Handle, reason: u8) -> Event {
        Event::Closed { handle, reason }
    }

    fn message(handle: Handle, plaintext: &[u8]) -> Event {
        Event::Message {
            handle,
            plaintext: plaintext.to_vec(),
        }
    }

    #[test]
    fn frames_round_trip_and_malformed_ones_are_refused_whole() {
        let mut frame = Vec::new();
        encode_cell(&mut frame, 7, Kind::Data, 0, b"hello");
        encode_cell(&mut frame, 8, Kind::Destroy, DESTROY_TIMEOUT, b"");
        let cells = decode_frame(&frame, MAX).unwrap();
        assert_eq!(
            cells[0],
            Cell {
                circuit: 7,
                kind: Kind::Data,
                reason: 0,
                payload: b"hello"
            }
        );
        assert_eq!(
            cells[1],
            Cell {
                circuit: 8,
                kind: Kind::Destroy,
                reason: DESTROY_TIMEOUT,
                payload: b""
            }
        );
        assert!(decode_frame(&frame[..frame.len() - 1], MAX).is_err(), "truncated");
        let mut unknown = frame.clone();
        unknown[4] = 9;
        assert!(decode_frame(&unknown, MAX).is_err(), "unknown kind");
        assert!(decode_frame(&frame, 4).is_err(), "a cell longer than allowed");
        let mut engine = Engine::new(MAX);
        assert!(engine.receive(1, &unknown, Instant::now()).is_err());
        assert!(
            engine.take_events().is_empty(),
            "nothing of a malformed frame is processed"
        );
    }

    #[test]
    fn cells_cross_the_relay_both_ways_and_it_sees_no_plaintext() {
        let mut path = Path::new();
        path.open(1);
        path.open(2); // a second circuit on the same links
        path.router.send(1, b"request one", path.now).unwrap();
        path.router.send(2, b"request two", path.now).unwrap();
        let frames = path.router.take_frames(MAX);
        assert_eq!(frames.len(), 1, "both circuits' cells in one frame");
        assert!(!frames[0].1.windows(7).any(|w| w == b"request"), "sealed for every hop");
        path.relay.receive(RELAY_FROM_ROUTER, &frames[0].1, path.now).unwrap();
        path.pump();
        assert_eq!(
            path.exit.take_events(),
            vec![message(1001, b"request one"), message(1002, b"request two"),]
        );
        for token in [b"tok-a".as_slice(), b"tok-b"] {
            path.exit.send(1001, token, path.now).unwrap();
        }
        path.pump();
        assert_eq!(
            path.router.take_events(),
            vec![message(1, b"tok-a"), message(1, b"tok-b"),]
        );
        assert_eq!(path.relay.forwarded.forward_cells, 2);
        assert_eq!(path.relay.forwarded.backward_cells, 2);
        assert!(path.relay.take_events().is_empty());
    }

    #[test]
    fn a_tampered_cell_closes_the_circuit_both_ways_and_goes_no_further() {
        let mut path = Path::new();
        path.open(1);
        path.router.send(1, b"request", path.now).unwrap();
        let (_, mut frame) = path.router.take_frames(MAX).pop().unwrap();
        let last = frame.len() - 1;
        frame[last] ^= 1;
        path.relay.receive(RELAY_FROM_ROUTER, &frame, path.now).unwrap();
        path.pump();
        // The exit saw no message: only that the circuit closed (and its set-up's admission ends).
        let released = Event::Released {
            link: EXIT_FROM_RELAY,
            circuit: 1,
            reason: DESTROY_PROTOCOL_ERROR,
        };
        assert_eq!(
            path.exit.take_events(),
            vec![closed(1001, DESTROY_PROTOCOL_ERROR), released]
        );
        let released = Event::Released {
            link: RELAY_FROM_ROUTER,
            circuit: 1,
            reason: DESTROY_PROTOCOL_ERROR,
        };
        assert_eq!(path.relay.take_events(), vec![released]);
        assert_eq!(path.relay.circuits(), 0);
        assert_eq!(path.router.take_events(), vec![closed(1, DESTROY_PROTOCOL_ERROR)]);
        assert_eq!(path.router.circuits(), 0);
        assert_eq!(path.exit.circuits(), 0, "the exit was told too");
    }

    #[test]
    fn a_lost_link_closes_its_circuits_and_tells_the_other_side() {
        let mut path = Path::new();
        path.open(1);
        path.relay.link_lost(RELAY_TO_EXIT);
        path.pump();
        assert_eq!(path.router.take_events(), vec![closed(1, DESTROY_HOP_UNREACHABLE)]);
        assert_eq!(path.relay.circuits(), 0);
        assert!(
            path.router.send(1, b"late", path.now).is_err(),
            "a closed handle sends nothing"
        );
    }

    #[test]
    fn refused_and_idle_circuits_close_and_frames_keep_to_their_size() {
        let mut path = Path::new();
        let specs = [HopSpec {
            onion_key: path.relay_key.public_key(),
            routing_info: b"",
        }];
        let (onion, circuit) = Circuit::build(&specs, b"").unwrap();
        path.router
            .originate(ROUTER_TO_RELAY, circuit, &onion, 5, path.now)
            .unwrap();
        path.pump();
        let Some(Event::Setup { link, circuit, .. }) = path.relay.take_events().pop() else {
            panic!()
        };
        path.relay.refuse(link, circuit, 5).unwrap();
        path.pump();
        assert_eq!(path.router.take_events(), vec![closed(5, 5)]);

        path.open(1);
        path.relay
            .expire(path.now + Duration::from_secs(301), Duration::from_secs(300));
        path.pump();
        assert_eq!(path.router.take_events(), vec![closed(1, DESTROY_TIMEOUT)]);
        assert_eq!(path.exit.circuits(), 0);

        path.open(2);
        for _ in 0..10 {
            path.router.send(2, &[0u8; 100], path.now).unwrap();
        }
        let cell = HEADER + 100 + 2 * crate::onion::TAG_SIZE;
        let first = path.router.take_frames(3 * cell);
        assert_eq!(first[0].1.len(), 3 * cell, "whole cells up to the size");
        let sizes: Vec<usize> =
            std::iter::from_fn(|| path.router.take_frames(3 * cell).pop().map(|f| f.1.len())).collect();
        assert_eq!(sizes, vec![3 * cell, 3 * cell, cell]);
    }
}
