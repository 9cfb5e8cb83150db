"""The inference node's end of a multipath request (``PrivacyOptions.paths``): several circuits,
each carrying one S-IDA share of the request, joined by their group id; once ``k`` shares are in,
the request is served once and every answer message is split again, share ``i`` going back on
the circuit that brought share ``i`` of the request.

Invariants: a group serves at most one request, and only once ``k`` distinct shares of it
rebuilt and authenticated; a path that closes (its relay died) leaves the group and the others
carry on; the request is cancelled when fewer than ``k`` paths remain (nobody could rebuild the
answer); a group that does not gather ``k`` shares within ``join_timeout_s`` is dropped with an
error on the paths that came; at most ``max_groups`` groups wait or run at once, and a path whose
answer queue holds ``_PATH_QUEUE`` messages (it reads too slowly) is dropped rather than let memory
grow.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from services.relay.circuit import error_message, pad_message
from swarmserve import native
from swarmserve.rpc import InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from swarmserve.telemetry import get_logger
from swarmserve.v1 import relay_pb2

__all__ = ["MultipathGroups"]

log = get_logger("swarmserve.inference")

Serve = Callable[[relay_pb2.CircuitMessage], AsyncIterator[bytes]]
"""Serves a rebuilt request: its answer as padded ``CircuitMessage`` plaintexts."""

_PATH_QUEUE = 1024  # answer messages a path may lag behind before it is dropped


@dataclass
class _Group:
    k: int
    n: int
    shares: dict[int, bytes] = field(default_factory=dict)  # the request's, by path index
    paths: dict[int, asyncio.Queue[bytes | None]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    complete: asyncio.Event = field(default_factory=asyncio.Event)


class MultipathGroups:
    def __init__(self, max_groups: int = 256, join_timeout_s: float = 10.0) -> None:
        self._groups: dict[bytes, _Group] = {}
        self._max_groups = max_groups
        self._join_timeout_s = join_timeout_s

    def __len__(self) -> int:
        return len(self._groups)

    async def join(self, share: relay_pb2.MultipathShare, serve: Serve) -> AsyncIterator[bytes]:
        """One path of a group: its answer shares as padded plaintexts, until the answer ends
        (or a padded error, for a path that cannot join)."""
        try:
            index, k, n = native.sida_share_info(share.share)
            if len(share.group) != 16 or share.sequence != 0:
                raise InvalidArgument("a multipath request share needs a 16-byte group and sequence 0")
            group = self._group(share.group, k, n)
            if index in group.shares:
                raise InvalidArgument(f"path {index} of this multipath group already joined")
        except (native.CryptoError, ServiceError) as error:
            failure = error if isinstance(error, ServiceError) else InvalidArgument(f"bad multipath share: {error}")
            yield error_message(failure.code, str(failure))
            return
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()  # bounded by dropping the path (_serve)
        group.shares[index] = share.share
        group.paths[index] = queue
        try:
            if len(group.shares) >= group.k and group.task is None:
                group.task = asyncio.create_task(self._serve(share.group, group, serve))
            try:
                async with asyncio.timeout(self._join_timeout_s):
                    await group.complete.wait()
            except TimeoutError:
                yield error_message(
                    Unavailable.code, f"only {len(group.shares)} of the {group.k} shares of the request arrived in time"
                )
                return
            while (message := await queue.get()) is not None:
                yield message
        finally:
            group.paths.pop(index, None)
            self._leave(share.group, group)

    def _group(self, group_id: bytes, k: int, n: int) -> _Group:
        group = self._groups.get(group_id)
        if group is None:
            if len(self._groups) >= self._max_groups:
                raise ResourceExhausted(f"this node holds its maximum of {self._max_groups} multipath groups")
            group = self._groups[group_id] = _Group(k, n)
        elif (group.k, group.n) != (k, n):
            raise InvalidArgument("the share's k-of-n is not its group's")
        elif group.task is not None and group.task.done():
            raise InvalidArgument("this multipath group's request was served already")
        return group

    def _leave(self, group_id: bytes, group: _Group) -> None:
        """A path left: the group ends with its last path, its request with its k-th last."""
        if group.task is not None and not group.task.done() and len(group.paths) < group.k:
            group.task.cancel()  # nobody could rebuild the answer any more
        if not group.paths and self._groups.get(group_id) is group:
            del self._groups[group_id]

    async def _serve(self, group_id: bytes, group: _Group, serve: Serve) -> None:
        group.complete.set()
        try:
            try:
                plaintext = native.sida_combine(list(group.shares.values()))
                request = relay_pb2.CircuitMessage.FromString(plaintext)
            except (native.CryptoError, DecodeError) as error:
                answers: AsyncIterator[bytes] = _single(
                    error_message(InvalidArgument.code, f"the multipath request does not rebuild: {error}")
                )
            else:
                answers = serve(request)
            sequence = 0
            async for answer in answers:
                shares = native.sida_split(answer, group.n, group.k)
                for index, queue in list(group.paths.items()):
                    message = relay_pb2.CircuitMessage(
                        share=relay_pb2.MultipathShare(group=group_id, sequence=sequence, share=shares[index])
                    )
                    if queue.qsize() >= _PATH_QUEUE:
                        log.warning("multipath path too slow; dropped", path=index)
                        group.paths.pop(index, None)
                        queue.put_nowait(None)
                        continue
                    queue.put_nowait(pad_message(message))
                sequence += 1
        finally:
            for queue in group.paths.values():
                queue.put_nowait(None)


async def _single(message: bytes) -> AsyncIterator[bytes]:
    yield message
