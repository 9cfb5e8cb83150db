"""The native link engine through its Python surface (``native.LinkEngine``, ``native/src/link.rs``):
a router, a relay and an exit engine, frames moved between them by this test as links would.

Tried: two circuits sharing a link, their cells batched in one frame, the relay's frames never
holding the plaintext; a set-up's hop handed to the engine is no longer usable from Python; a
tampered cell closes the circuit at both ends and delivers nothing; a refused set-up, a lost link,
idle expiry; a malformed frame is refused whole; a second decision on a set-up is refused."""

from __future__ import annotations

import pytest

from swarmserve import native

ROUTER_TO_RELAY, RELAY_FROM_ROUTER, RELAY_TO_EXIT, EXIT_FROM_RELAY = 1, 10, 11, 20
PROTOCOL_ERROR, HOP_UNREACHABLE, TIMEOUT, RESOURCE_LIMIT = 2, 3, 4, 5


class Path:
    def __init__(self) -> None:
        self.router, self.relay, self.exit = native.LinkEngine(), native.LinkEngine(), native.LinkEngine()
        self.relay_key, self.exit_key = native.OnionKey.generate(), native.OnionKey.generate()
        self.relay_frames: list[bytes] = []  # what the relay sent either way

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for _, frame in self.router.take_frames(65536):
                self.relay.receive(RELAY_FROM_ROUTER, frame)
                moved = True
            for link, frame in self.relay.take_frames(65536):
                self.relay_frames.append(frame)
                if link == RELAY_FROM_ROUTER:
                    self.router.receive(ROUTER_TO_RELAY, frame)
                else:
                    self.exit.receive(EXIT_FROM_RELAY, frame)
                moved = True
            for _, frame in self.exit.take_frames(65536):
                self.relay.receive(RELAY_TO_EXIT, frame)
                moved = True

    def open(self, handle: int) -> native.CircuitHop:
        hops = [(self.relay_key.public_key, b"exit"), (self.exit_key.public_key, b"")]
        self.router.originate(ROUTER_TO_RELAY, hops, handle)
        self.pump()
        [(_, link, circuit, onion)] = [e for e in self.relay.take_events() if e[0] == "setup"]
        peeled = self.relay_key.peel_setup(onion)
        assert peeled.routing_info == b"exit" and peeled.next_cell is not None
        hop = peeled.hop
        self.relay.extend(link, circuit, hop, RELAY_TO_EXIT, peeled.next_cell)
        self.pump()
        [(_, link, circuit, onion)] = [e for e in self.exit.take_events() if e[0] == "setup"]
        self.exit.terminate(link, circuit, self.exit_key.peel_setup(onion).hop, handle + 1000)
        self.pump()
        assert self.router.take_events() == [("opened", handle)]
        return hop


def test_cells_cross_a_relay_both_ways_batched_and_sealed() -> None:
    path = Path()
    hop = path.open(1)
    path.open(2)
    with pytest.raises(native.CircuitClosedError):
        hop.peel_forward(bytes(32))  # the engine holds the hop now
    path.router.send(1, b"the prompt of one")
    path.router.send(2, b"the prompt of two")
    frames = path.router.take_frames(65536)
    assert len(frames) == 1, "both circuits' cells travel in one frame"
    path.relay.receive(RELAY_FROM_ROUTER, frames[0][1])
    path.pump()
    assert path.exit.take_events() == [("message", 1001, b"the prompt of one"), ("message", 1002, b"the prompt of two")]
    for token in (b"Paris", b" is"):
        path.exit.send(1001, token)
    path.pump()
    assert path.router.take_events() == [("message", 1, b"Paris"), ("message", 1, b" is")]
    assert not any(b"prompt" in frame or b"Paris" in frame for frame in path.relay_frames)
    assert path.relay.forwarded[:2] == (2, 2)


def test_a_tampered_cell_closes_both_ends_and_delivers_nothing() -> None:
    path = Path()
    path.open(1)
    path.router.send(1, b"the prompt")
    [(_, frame)] = path.router.take_frames(65536)
    path.relay.receive(RELAY_FROM_ROUTER, frame[:-1] + bytes([frame[-1] ^ 1]))
    path.pump()
    assert path.router.take_events() == [("closed", 1, PROTOCOL_ERROR)]
    assert ("closed", 1001, PROTOCOL_ERROR) in path.exit.take_events()
    assert path.relay.circuits == path.exit.circuits == path.router.circuits == 0
    with pytest.raises(native.CircuitClosedError):
        path.router.send(1, b"again")


def test_refusals_lost_links_idle_circuits_and_malformed_frames() -> None:
    path = Path()
    path.router.originate(ROUTER_TO_RELAY, [(path.relay_key.public_key, b"")], 7)
    path.pump()
    [(_, link, circuit, _)] = path.relay.take_events()
    path.relay.refuse(link, circuit, RESOURCE_LIMIT)
    with pytest.raises(ValueError, match="no set-up is waiting"):
        path.relay.refuse(link, circuit, RESOURCE_LIMIT)  # decided once
    path.pump()
    assert path.router.take_events() == [("closed", 7, RESOURCE_LIMIT)]

    path.open(1)
    path.relay.link_lost(RELAY_TO_EXIT)  # the transport broke: both of its ends see it
    path.exit.link_lost(EXIT_FROM_RELAY)
    path.pump()
    assert path.router.take_events() == [("closed", 1, HOP_UNREACHABLE)]
    assert ("closed", 1001, HOP_UNREACHABLE) in path.exit.take_events()

    path.open(2)
    path.relay.expire(0.0)
    path.pump()
    assert path.router.take_events() == [("closed", 2, TIMEOUT)]

    with pytest.raises(native.MalformedCellError):
        path.relay.receive(RELAY_FROM_ROUTER, b"\x00\x00\x00\x01\x03\x00\x00\x00\x00\x09abc")
    with pytest.raises(ValueError):
        path.relay.expire(-1.0)
