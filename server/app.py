"""The coordinator's web server: pages, the REST API, the signaling WebSocket, and the round loop's lifetime.

Routes only; the round logic is in coordinator.py and signaling in signaling.py. Never serve files from
outside the project's browser/ and pyodide directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from server.bundle import BundleCache, bundle_endpoint
from server.coordinator import Coordinator
from shared.governance import Proposal, Vote
from server.signaling import SignalingServer

log = logging.getLogger("swarmgrad.app")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BROWSER_DIR = PROJECT_ROOT / "browser"
PYODIDE_DIR = PROJECT_ROOT / "node_modules" / "pyodide"


MAX_REQUEST_BYTES = 65_536  # a signed proposal or vote is a few hundred bytes; nothing we accept is larger


async def read_json(request: Request) -> object:
    """The request's JSON body, read no further than MAX_REQUEST_BYTES (ValueError beyond, or on bad JSON)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise ValueError(f"request body exceeds {MAX_REQUEST_BYTES} bytes")
    return json.loads(body)


def create_app(coordinator: Coordinator) -> Starlette:
    signaling = SignalingServer(coordinator)

    async def index(request: Request) -> Response:
        return FileResponse(BROWSER_DIR / "index.html")

    async def dashboard(request: Request) -> Response:
        return FileResponse(BROWSER_DIR / "dashboard.html")

    async def status(request: Request) -> Response:
        return JSONResponse(coordinator.status())

    async def governance(request: Request) -> Response:
        return JSONResponse(coordinator.governor.describe())

    async def submit(request: Request, kind: str) -> Response:
        """POST a signed proposal or vote (JSON of shared.governance.Proposal / Vote, signature included)."""
        try:
            body = await read_json(request)
            if kind == "proposal":
                result = coordinator.governor.propose(Proposal.from_dict(body))
            else:
                coordinator.governor.vote(Vote.from_dict(body))
                result = {"recorded": True}
        except (ValueError, KeyError, TypeError) as e:  # GovernanceError is a ValueError; bad JSON too
            return JSONResponse({"error": f"{kind} refused: {e}"}, status_code=400)
        return JSONResponse(result, status_code=201)

    async def proposals(request: Request) -> Response:
        return await submit(request, "proposal")

    async def votes(request: Request) -> Response:
        return await submit(request, "vote")

    async def ledger(request: Request) -> Response:
        node = request.query_params.get("node")
        entries = coordinator.store.ledger_entries()
        if node:
            entries = [e for e in entries if e["node"] == node]
        return JSONResponse({"balances": coordinator.store.balances(), "head": coordinator.governor.ledger.head,
                             "entries": entries[-int(request.query_params.get("limit", 200)):]})

    async def shard(request: Request) -> Response:
        try:
            index = int(request.path_params["index"])
            data = coordinator.corpus.shard(index)
        except (ValueError, IndexError) as e:
            return JSONResponse({"error": f"bad shard index: {e}"}, status_code=400)
        return Response(data, media_type="application/octet-stream")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        task = asyncio.create_task(coordinator.run(), name="rounds")

        def on_done(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("the round loop failed; stopping the coordinator", exc_info=t.exception())
                os._exit(3)  # a coordinator without its round loop must not keep answering as if healthy

        task.add_done_callback(on_done)
        try:
            yield
        finally:
            task.cancel()
            await signaling.close()

    routes = [
        Route("/", index),
        Route("/dashboard", dashboard),
        Route("/api/status", status),
        Route("/api/shards/{index}", shard),
        Route("/api/governance", governance),
        Route("/api/governance/proposals", proposals, methods=["POST"]),
        Route("/api/governance/votes", votes, methods=["POST"]),
        Route("/api/ledger", ledger),
        Route("/bundle.zip", bundle_endpoint(BundleCache())),
        WebSocketRoute("/ws", signaling.endpoint),
        Mount("/static", StaticFiles(directory=BROWSER_DIR), name="static"),
    ]
    if PYODIDE_DIR.is_dir():
        routes.append(Mount("/pyodide", StaticFiles(directory=PYODIDE_DIR), name="pyodide"))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.coordinator = coordinator
    app.state.signaling = signaling
    return app
