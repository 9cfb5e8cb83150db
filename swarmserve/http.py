"""An HTTP server (uvicorn, serving an ASGI app) inside a node's own asyncio loop, beside its gRPC
server: the router's OpenAI-compatible API and dashboard, and every node's ``/metrics``.

uvicorn runs in the node's loop rather than its own process or thread so that HTTP handlers call
the node's services directly (one path, no copy, no cross-loop hand-off). The node binds the
socket itself, so a port in use is a clear error at start (uvicorn would exit the process), and
it keeps its own signal handling (uvicorn would take SIGINT and SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from swarmserve.config import host_of

__all__ = ["HttpServer"]


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the node handles signals


class HttpServer:
    def __init__(self, app: Any, listen: str) -> None:
        self._app = app
        self._listen = listen
        self._server: _InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        host = host_of(self._listen)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        host = host_of(self._listen)
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        return f"http://[{shown}]:{self.port}" if ":" in shown else f"http://{shown}:{self.port}"

    async def start(self) -> None:
        host = host_of(self._listen)
        port = int(self._listen.rsplit(":", 1)[1])
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            raise OSError(f"cannot serve HTTP on {self._listen}: {error.strerror or error}") from None
        sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app, lifespan="off", log_config=None, access_log=False, timeout_graceful_shutdown=2
        )
        self._server = _InLoopServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP server on {self._listen} stopped at start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = self._task = None
