"""Links: one long-lived ``Relay.Link`` stream per pair of neighbours carrying all of their
circuits (Tor's channels), with every per-cell step in the native engine (``native/src/link.rs``).

Python's part is per *frame*, not per cell: a frame that arrives goes to the engine whole; the
engine's events are acted on here (a set-up to admit, a plaintext for a circuit end on this node,
a relayed circuit released); what the engine queued for each link goes to that link's writer.
A writer sends whatever is queued whenever it is free, so with no backlog a cell leaves at once
and under backlog many cells, of any circuits, share one message.

Invariants:
- the side that dials a link is the side towards the circuits' origins: set-ups are taken only
  on links this node accepted (and only by a node with ``on_setup``); one that comes back on a
  link this node dialled is refused (PROTOCOL_ERROR);
- a link that ends, fails, or sends a malformed frame is lost: every circuit on it closes, the
  other side of each told HOP_UNREACHABLE; one dialled link per neighbour address, re-dialled on
  the next circuit after a loss;
- a link whose peer reads slower than ``MAX_LINK_BACKLOG_BYTES`` of queued frames is dropped:
  memory is bounded, and the circuits on it fail as if the peer had gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

from grpc import aio

from swarmserve import native
from swarmserve.rpc import STREAM_EOF, ChannelPool, InvalidArgument, open_stream
from swarmserve.telemetry import get_logger
from swarmserve.v1 import relay_pb2, relay_pb2_grpc

__all__ = ["CircuitEnd", "EndClosed", "LinkPlane"]

log = get_logger("swarmserve.relay")

MAX_FRAME_BYTES = 256 * 1024  # one gRPC message; a larger single cell still goes alone
MAX_LINK_BACKLOG_BYTES = 32 * 1024 * 1024
_UNREAD_MESSAGES = 4096  # plaintexts an end holds for a reader that stopped reading

SetupHandler = Callable[[int, int, bytes], None]  # link, circuit, onion
ReleaseHandler = Callable[[int, int], None]  # link, circuit


class EndClosed(Exception):
    """The circuit of a :class:`CircuitEnd` is gone; ``reason`` is its DestroyReason."""

    def __init__(self, reason: int) -> None:
        super().__init__(f"circuit closed ({reason})")
        self.reason = reason


class CircuitEnd:
    """This node's end of a circuit on the links (one it originated, or one it terminates):
    the plaintexts that arrived, in order, then the reason it closed."""

    def __init__(self, plane: LinkPlane, handle: int, link: int | None = None) -> None:
        self._plane = plane
        self.handle = handle
        self.link = link  # the link its cells leave on, where this node terminates it
        self._messages: asyncio.Queue[bytes | EndClosed] = asyncio.Queue()
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: EndClosed | None = None
        self.task: asyncio.Task[None] | None = None  # what serves it here, cancelled when it closes

    async def opened(self) -> None:
        """Returns once the whole path confirmed the set-up; raises :class:`EndClosed`."""
        await asyncio.shield(self._opened)

    def send(self, plaintext: bytes) -> None:
        """Seals ``plaintext`` and queues it; raises :class:`EndClosed` once the circuit is gone."""
        if self.closed is not None:
            raise self.closed
        self._plane.send(self.handle, plaintext)

    async def writable(self) -> None:
        """Returns at once if the link this end sends on has nothing waiting, else once the
        link's writer has finished its current write: a caller that sends only after this
        holds what it has to send while the link is backlogged, and can join it up."""
        if self.link is not None:
            await self._plane.written(self.link)

    async def receive(self) -> bytes:
        """The next plaintext; raises :class:`EndClosed` once none will come."""
        item = await self._messages.get()
        if isinstance(item, EndClosed):
            self._messages.put_nowait(item)  # every later call sees the closure too
            raise item
        return item

    def close(self, reason: int = relay_pb2.DESTROY_REASON_FINISHED) -> None:
        """Ends the circuit from this side (the path is told ``reason``)."""
        if self.closed is None:
            self._plane.close_circuit(self.handle, reason)

    def _open(self) -> None:
        if not self._opened.done():
            self._opened.set_result(None)

    def _deliver(self, plaintext: bytes) -> None:
        if self._messages.qsize() >= _UNREAD_MESSAGES:
            self._plane.close_circuit(self.handle, relay_pb2.DESTROY_REASON_RESOURCE_LIMIT)
            return
        self._messages.put_nowait(plaintext)

    def _close(self, reason: int) -> None:
        self.closed = EndClosed(reason)
        self._messages.put_nowait(self.closed)
        if not self._opened.done():
            self._opened.set_exception(self.closed)
            self._opened.exception()  # retrieved: nobody may be waiting any more
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class _Link:
    """One link's outgoing side: frames the engine queued, taken by its writer when free."""

    def __init__(self, link_id: int, peer: str, dialled: bool) -> None:
        self.id = link_id
        self.peer = peer  # the neighbour's address (dialled) or gRPC's name of the caller
        self.dialled = dialled
        self._frames: list[bytes] = []
        self.backlog = 0
        self._wake = asyncio.Event()
        self._writing = False
        self._written: asyncio.Future[None] | None = None
        self.lost = False
        self.error: Exception | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def queue(self, frame: bytes) -> None:
        self._frames.append(frame)
        self.backlog += len(frame)
        self._wake.set()

    def end(self) -> None:
        self.lost = True
        self._wake.set()
        self._release_waiters()  # nothing more will be written: nobody waits for it

    async def outgoing(self) -> AsyncIterator[bytes]:
        """Batches of whole frames (each a valid frame), as soon as there is anything to send."""
        while True:
            await self._wake.wait()
            # One turn of the event loop before taking them: frames that other callbacks ready
            # now (other links' reads, other circuits' tokens) join this message.
            await asyncio.sleep(0)
            self._wake.clear()
            while self._frames and not self.lost:
                size, count = 0, 0
                for frame in self._frames:
                    if count and size + len(frame) > MAX_FRAME_BYTES:
                        break
                    size, count = size + len(frame), count + 1
                batch = self._frames[0] if count == 1 else b"".join(self._frames[:count])
                del self._frames[:count]
                self.backlog -= size
                self._writing = True
                yield batch  # returns when the consumer takes the next: this one is written
                self._writing = False
                self._release_waiters()
            if self.lost:
                return

    def _release_waiters(self) -> None:
        if self._written is not None:
            self._written.set_result(None)
            self._written = None

    async def written(self) -> None:
        """Returns at once if nothing waits to be written, else after the next write."""
        if self.lost or not (self._frames or self._writing):
            return
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._written)


class LinkPlane:
    """Every link of this node and the native engine behind them.

    ``on_setup`` (set by the node that admits set-ups: ``RelayServicer``) decides each set-up
    that arrives (with :meth:`extend`, :meth:`terminate` or :meth:`refuse`, before it returns);
    a node without one (a router) refuses them. ``on_release`` hears of each admitted set-up that
    is over."""

    def __init__(
        self,
        channels: ChannelPool,
        *,
        idle_timeout_s: float,
        max_cell_bytes: int = 65536,
    ) -> None:
        self._channels = channels
        self._idle_timeout_s = idle_timeout_s
        self.engine = native.LinkEngine(max_cell_bytes)
        self.on_setup: SetupHandler | None = None
        self.on_release: ReleaseHandler | None = None
        self._links: dict[int, _Link] = {}
        self._dialled: dict[str, int] = {}  # neighbour address -> its link
        self._ends: dict[int, CircuitEnd] = {}
        self._ids = itertools.count(1)
        self._expiry: asyncio.Task[None] | None = None
        self.frames = {"sent": 0, "received": 0}  # read by /metrics

    # -- circuit ends on this node --------------------------------------------------------

    def originate(self, address: str, hops: list[tuple[bytes, bytes]]) -> CircuitEnd:
        """Starts a circuit over the link to ``address`` (the first hop); ``hops`` as for
        ``native.Circuit.build``. Await :meth:`CircuitEnd.opened` for its confirmation."""
        end = self._new_end()
        self.engine.originate(self._dial(address), hops, end.handle)
        self._after()
        return end

    def terminate(self, link: int, circuit: int, hop: native.CircuitHop) -> CircuitEnd:
        """Ends an admitted set-up here: confirms it; its plaintexts go to the returned end."""
        end = self._new_end(link)
        self.engine.terminate(link, circuit, hop, end.handle)
        self._after()
        return end

    def extend(self, link: int, circuit: int, hop: native.CircuitHop, address: str, next_cell: bytes) -> None:
        """Passes an admitted set-up on to the member at ``address``."""
        self.engine.extend(link, circuit, hop, self._dial(address), next_cell)
        self._after()

    def refuse(self, link: int, circuit: int, reason: int) -> None:
        self.engine.refuse(link, circuit, reason)
        self._after()

    def peer_of(self, link: int) -> str:
        return self._links[link].peer

    def send(self, handle: int, plaintext: bytes) -> None:
        self.engine.send(handle, plaintext)
        self._after()

    def close_circuit(self, handle: int, reason: int) -> None:
        self.engine.close(handle, reason)
        self._after()

    async def written(self, link: int) -> None:
        """See :meth:`_Link.written`; returns at once for a link that is gone."""
        known = self._links.get(link)
        if known is not None:
            await known.written()

    def _new_end(self, link: int | None = None) -> CircuitEnd:
        end = CircuitEnd(self, next(self._ids), link)
        self._ends[end.handle] = end
        return end

    # -- links ----------------------------------------------------------------------------

    def _dial(self, address: str) -> int:
        known = self._dialled.get(address)
        if known is not None:
            return known
        link = self._add_link(address, dialled=True)
        self._dialled[address] = link.id
        link.tasks.append(asyncio.create_task(self._run_dialled(link, address)))
        return link.id

    def _add_link(self, peer: str, dialled: bool) -> _Link:
        link = _Link(next(self._ids), peer, dialled)
        self._links[link.id] = link
        if self._expiry is None:
            self._expiry = asyncio.create_task(self._expire())
        return link

    async def _run_dialled(self, link: _Link, address: str) -> None:
        call = open_stream(relay_pb2_grpc.RelayStub(self._channels.get(address)).Link)

        async def write() -> None:
            async for batch in link.outgoing():
                await call.write(relay_pb2.LinkFrame(cells=batch))
                self.frames["sent"] += 1

        writer = asyncio.create_task(write())
        try:
            while (frame := await call.read()) is not STREAM_EOF:
                if not self._receive(link, frame.cells):
                    break
        except (aio.AioRpcError, asyncio.InvalidStateError) as error:
            log.info("link lost", peer=address, reason=str(error))
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, aio.AioRpcError, asyncio.InvalidStateError):
                await writer
            call.cancel()
            self._lose(link)

    async def serve(
        self, requests: AsyncIterator[relay_pb2.LinkFrame], peer: str
    ) -> AsyncIterator[relay_pb2.LinkFrame]:
        """The ``Relay.Link`` call of a neighbour that dialled this node."""
        link = self._add_link(peer, dialled=False)

        async def read() -> None:
            try:
                async for frame in requests:
                    if not self._receive(link, frame.cells):
                        return
            except InvalidArgument as error:  # an undecodable message (the interceptor's check)
                link.error = error
            except aio.AioRpcError:
                pass  # the caller went away: the link is lost, nothing to tell it
            finally:
                self._lose(link)

        reader = asyncio.create_task(read())
        link.tasks.append(reader)
        try:
            async for batch in link.outgoing():
                yield relay_pb2.LinkFrame(cells=batch)
                self.frames["sent"] += 1
        finally:
            reader.cancel()
            self._lose(link)
        if link.error is not None:
            raise link.error

    def _receive(self, link: _Link, cells: bytes) -> bool:
        """Hands a frame to the engine; False when it was malformed (the link is then lost)."""
        self.frames["received"] += 1
        try:
            self.engine.receive(link.id, cells)
        except native.MalformedCellError as error:
            log.warning("malformed link frame; dropping the link", peer=link.peer, reason=str(error))
            link.error = InvalidArgument(f"malformed link frame: {error}")
            self._lose(link)
            return False
        self._after()
        return True

    def _lose(self, link: _Link) -> None:
        if self._links.pop(link.id, None) is None:
            return
        if link.dialled and self._dialled.get(link.peer) == link.id:
            del self._dialled[link.peer]
        link.end()
        self.engine.link_lost(link.id)
        self._after()

    # -- what the engine did --------------------------------------------------------------

    def _after(self) -> None:
        """Acts on the engine's events and hands its frames to the links' writers."""
        while events := self.engine.take_events():
            for event in events:
                self._act(event)
        overflowing = []
        for link_id, frame in self.engine.take_frames(MAX_FRAME_BYTES):
            link = self._links.get(link_id)
            if link is None:
                continue
            link.queue(frame)
            if link.backlog > MAX_LINK_BACKLOG_BYTES:
                overflowing.append(link)
        for link in overflowing:
            log.warning("link backlog over its bound; dropping the link", peer=link.peer, bytes=link.backlog)
            self._lose(link)

    def _act(self, event: Any) -> None:
        kind = event[0]
        if kind == "setup":
            _, link, circuit, onion = event
            carrier = self._links.get(link)
            if self.on_setup is None or carrier is None or carrier.dialled:
                self._refuse_pending(link, circuit)
                return
            try:
                self.on_setup(link, circuit, onion)
            except Exception:
                log.exception("a set-up's admission failed; refused")
                self._refuse_pending(link, circuit)
        elif kind == "released":
            if self.on_release is not None:
                self.on_release(event[1], event[2])
        else:
            end = self._ends.get(event[1])
            if end is None:
                return
            if kind == "opened":
                end._open()
            elif kind == "message":
                end._deliver(event[2])
            elif kind == "closed":
                del self._ends[end.handle]
                end._close(event[2])

    def _refuse_pending(self, link: int, circuit: int) -> None:
        with contextlib.suppress(ValueError):  # already withdrawn or decided
            self.engine.refuse(link, circuit, relay_pb2.DESTROY_REASON_PROTOCOL_ERROR)

    async def _expire(self) -> None:
        """Closes circuits idle for the idle timeout (TIMEOUT both ways)."""
        while True:
            await asyncio.sleep(min(self._idle_timeout_s / 4, 15.0))
            self.engine.expire(self._idle_timeout_s)
            self._after()

    @property
    def links(self) -> int:
        return len(self._links)

    async def close(self) -> None:
        for link in list(self._links.values()):
            self._lose(link)
            for task in link.tasks:
                task.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
