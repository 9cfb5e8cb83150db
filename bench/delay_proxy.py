"""A TCP proxy that delays every byte by a one-way latency (and jitter), both ways: the WAN
testbed's stand-in for ``tc netem``, which this machine's kernel lacks (``bench/wan.py``).

Run in a node's network namespace in front of the node: it listens on the namespace's own
address, where the other nodes reach the node, and forwards to the node on the namespace's
loopback. A connection from A to B crosses B's proxy only, so each direction of it is delayed
once: ``--delay-ms`` is the one-way delay between any two nodes. Bytes leave in the order they
came (a chunk's jitter never lets it overtake the one before); TCP's own flow control is kept
by reading a side only while less than ``--buffer`` bytes of it wait.

    python -m bench.delay_proxy --listen 10.77.0.11:7100 --to 127.0.0.1:7100 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random

BUFFER = 4 << 20


async def pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float, jitter_s: float, rng: random.Random
) -> None:
    """Copies ``reader`` to ``writer``, each chunk released ``delay_s`` (+ jitter) after it came."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    room = asyncio.Semaphore(64)  # chunks in flight (with 64 KiB reads: BUFFER)

    async def release() -> None:
        while True:
            at, data = await queue.get()
            await asyncio.sleep(max(0.0, at - loop.time()))
            if not data:
                writer.write_eof() if writer.can_write_eof() else writer.close()
                return
            writer.write(data)
            room.release()
            await writer.drain()

    releaser = asyncio.create_task(release())
    last = 0.0
    try:
        while True:
            await room.acquire()
            data = await reader.read(65536)
            last = max(last, loop.time() + delay_s + (rng.uniform(-jitter_s, jitter_s) if jitter_s else 0.0))
            queue.put_nowait((last, data))
            if not data:
                break
        await releaser
    except (ConnectionError, asyncio.CancelledError):
        releaser.cancel()
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listen: str, to: str, delay_s: float, jitter_s: float) -> None:
    host, port = listen.rsplit(":", 1)
    to_host, to_port = to.rsplit(":", 1)
    rng = random.Random()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            node_reader, node_writer = await asyncio.open_connection(to_host, int(to_port))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pump(client_reader, node_writer, delay_s, jitter_s, rng),
            pump(node_reader, client_writer, delay_s, jitter_s, rng),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, host, int(port), limit=BUFFER)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--to", required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.to, args.delay_ms / 1000, args.jitter_ms / 1000))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
