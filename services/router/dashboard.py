"""The live dashboard on the router's HTTP port: ``/`` is a page (``static/``: plain HTML, CSS
and JavaScript shipped in the package, nothing from a CDN) that polls two JSON views and chats
through the OpenAI-compatible API beside it:

- ``GET /api/swarm``: every member this router knows (itself first) with its roles, state, load,
  reputation and credits, as gossip and this router's replica of the chain show them;
- ``GET /api/stats``: request rate and median time to first token over the last five minutes
  (``stats.py``), and requests in flight;
- ``POST /api/check-receipt``: checks the ``swarmserve`` object of an answer
  (:func:`swarmserve.client.check_openai_receipt`) for the page, which cannot verify Ed25519
  co-signatures over protobuf by itself. A user who does not trust this router checks the same
  object with ``swarmserve.client`` on their own machine.

The views are read-only and hold nothing secret (gossip and the chain are public to members);
the chat goes through ``/v1/chat/completions`` and needs an API key where the operator set some.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from swarmserve import native
from swarmserve.client import ReceiptError, check_openai_receipt
from swarmserve.v1 import common_pb2, overlay_pb2

if TYPE_CHECKING:
    from services.router.service import RouterService

__all__ = ["dashboard_routes", "swarm_members"]

ASSETS = Path(__file__).with_name("static")
_MAX_CHECK_BYTES = 4 << 20  # a receipt object of a long answer: token texts, base64


def _role(role: common_pb2.NodeRole.ValueType) -> str:
    return common_pb2.NodeRole.Name(role).removeprefix("NODE_ROLE_").lower()


def swarm_members(service: RouterService) -> list[dict[str, Any]]:
    """This router and every member it knows, alive first, then by node id."""
    chain, book = service.chain, service.trust.book()

    def credits(key: bytes) -> dict[str, int] | None:
        if chain is None:
            return None
        account = chain.state.account(key)
        return {"available": account.available, "bonded": account.bonded}

    own_key = service.identity.public_key
    members: list[dict[str, Any]] = [
        {
            "node_id": native.node_id(own_key),
            "address": service.membership.publisher.address,
            "roles": ["router"],
            "state": "alive",
            "self": True,
            "models": [],
            "load": None,
            "reputation": None,
            "credits": credits(own_key),
        }
    ]
    for peer in sorted(service.directory.peers(), key=lambda p: (p.state != overlay_pb2.MEMBER_STATE_ALIVE, p.node_id)):
        descriptor = peer.descriptor
        serving = common_pb2.NODE_ROLE_INFERENCE in descriptor.roles
        standing = book.standing(descriptor.identity_key)
        members.append(
            {
                "node_id": peer.node_id,
                "address": descriptor.address,
                "roles": [_role(r) for r in descriptor.roles],
                "state": overlay_pb2.MemberState.Name(peer.state).removeprefix("MEMBER_STATE_").lower(),
                "self": False,
                "models": [m.name for m in descriptor.models],
                "load": {
                    "running": descriptor.load.running,
                    "queued": descriptor.load.queued,
                    "slots": descriptor.capacity.max_concurrent,
                    "tokens_per_second": round(descriptor.load.tokens_per_second, 1),
                }
                if serving
                else None,
                "reputation": {
                    "score": round(standing.score, 3),
                    "verdicts": standing.verdicts,
                    "trusted": standing.trusted,
                    "convicted": standing.convicted,
                }
                if serving
                else None,
                "credits": credits(descriptor.identity_key),
            }
        )
    return members


def dashboard_routes(service: RouterService) -> list[BaseRoute]:
    async def page(request: Request) -> Response:
        return FileResponse(ASSETS / "index.html", headers={"cache-control": "no-cache"})

    async def swarm(request: Request) -> Response:
        return JSONResponse({"router": native.node_id(service.identity.public_key), "members": swarm_members(service)})

    async def stats(request: Request) -> Response:
        telemetry = service.telemetry
        return JSONResponse(
            {
                "step_s": 10,
                "in_flight": telemetry.in_flight_now,
                "series": [
                    {
                        "start_unix_s": p.start_unix_s,
                        "requests_per_s": p.requests_per_s,
                        "failed": p.failed,
                        "ttft_p50_s": p.ttft_p50_s,
                    }
                    for p in telemetry.recent.series(span_s=300, step_s=10)
                ],
            }
        )

    async def check_receipt(request: Request) -> Response:
        body = await request.body()
        if len(body) > _MAX_CHECK_BYTES:
            return JSONResponse({"checked": False, "reason": "the body is too large"}, status_code=413)
        try:
            asked = json.loads(body)
            answer, text = asked["swarmserve"], asked.get("text")
            if not isinstance(answer, dict) or not (text is None or isinstance(text, str)):
                raise TypeError("swarmserve must be an object and text a string")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            reason = f"expected {{'swarmserve': {{...}}, 'text': '...'}}: {error}"
            return JSONResponse({"checked": False, "reason": reason}, status_code=400)
        try:
            receipt = check_openai_receipt(answer, text)
        except ReceiptError as error:
            return JSONResponse({"checked": False, "reason": str(error)}, status_code=422)
        return JSONResponse(
            {
                "checked": True,
                "served_by": native.node_id(receipt.node_key),
                "model_digest": receipt.model_digest.hex(),
                "tokens": receipt.token_count,
            }
        )

    return [
        Route("/", page, methods=["GET"]),
        Route("/api/swarm", swarm, methods=["GET"]),
        Route("/api/stats", stats, methods=["GET"]),
        Route("/api/check-receipt", check_receipt, methods=["POST"]),
        Mount("/static", StaticFiles(directory=ASSETS), name="static"),
    ]
