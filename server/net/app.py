"""The coordinator's web server: pages, the REST API, the signaling WebSocket, and the round loop's lifetime.

Routes only; the round logic is in coordinator.py and signaling in signaling.py. Never serve files from
outside the project's browser/ and pyodide directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from server.export import latest_export_endpoint
from server.net.bundle import BundleCache, bundle_endpoint
from server.net.metrics import metrics_endpoint
from server.coordinator import Coordinator
from server.coordinator.leaderboard import leaderboard as leaderboard_view, to_csv
from server.tokenizer import TOKENIZER_FILE
from shared.governance import NotEligibleError, Proposal, Vote
from server.net.signaling import SignalingServer
from shared.wire import LimitExceeded, WireError, parse_json

log = logging.getLogger("swarmgrad.app")

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
BROWSER_DIR = PROJECT_ROOT / "browser"
PYODIDE_DIR = PROJECT_ROOT / "node_modules" / "pyodide"


MAX_REQUEST_BYTES = 65_536  # a signed proposal or vote is a few hundred bytes; nothing we accept is larger
LEDGER_PAGE = 200  # /api/ledger's entries when no limit is asked for ...
MAX_LEDGER_PAGE = 10_000  # ... and at most, whatever the limit asked for
HEX_DIGITS = frozenset("0123456789abcdef")


def refusal(code: str, message: str, status_code: int = 400) -> JSONResponse:
    """A typed error answer: `code` names the kind of error (a shared.wire WireError code where there is one)."""
    return JSONResponse({"error": message, "code": code}, status_code=status_code)


async def read_json(request: Request) -> object:
    """The request's JSON body, read no further than MAX_REQUEST_BYTES; a WireError (a ValueError) for a body
    that is too large, too deeply nested, not UTF-8 or not JSON (shared.wire.parse_json's checks)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise LimitExceeded(f"request body exceeds {MAX_REQUEST_BYTES} bytes")
    return parse_json(bytes(body), max_bytes=MAX_REQUEST_BYTES)


def create_app(coordinator: Coordinator) -> Starlette:
    signaling = SignalingServer(coordinator)

    async def index(request: Request) -> Response:
        return FileResponse(BROWSER_DIR / "index.html")

    async def dashboard(request: Request) -> Response:
        return FileResponse(BROWSER_DIR / "dashboard.html")

    async def status(request: Request) -> Response:
        return JSONResponse(coordinator.status())

    async def leaderboard_page(request: Request) -> Response:
        return FileResponse(BROWSER_DIR / "leaderboard.html")

    async def leaderboard(request: Request) -> Response:
        """Nodes and teams ranked by credits (server/coordinator/leaderboard.py). ?format=csv gives one table as
        CSV, the nodes or (?table=teams) the teams."""
        fmt, table = request.query_params.get("format", "json"), request.query_params.get("table", "nodes")
        if fmt not in ("json", "csv"):
            return refusal("bad_query", f"format must be json or csv, got {fmt[:40]!r}")
        if table not in ("nodes", "teams"):
            return refusal("bad_query", f"table must be nodes or teams, got {table[:40]!r}")
        board = leaderboard_view(coordinator)
        if fmt == "json":
            return JSONResponse(board)
        return Response(to_csv(board, table), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="swarmgrad-{table}.csv"'})

    async def governance(request: Request) -> Response:
        return JSONResponse(coordinator.governor.describe())

    async def submit(request: Request, kind: str) -> Response:
        """POST a signed proposal or vote (JSON of shared.governance.Proposal / Vote, signature included), stamped
        with the current round (±1). 403 when the signer may not take part, 400 for anything else refused."""
        try:
            body = await read_json(request)
            if kind == "proposal":
                result = coordinator.governor.propose(Proposal.from_dict(body), coordinator.round)
            else:
                coordinator.governor.vote(Vote.from_dict(body), coordinator.round)
                result = {"recorded": True}
        except WireError as e:  # the body itself: too large, too deep, or not JSON
            return refusal(e.code, f"{kind} refused: {e}")
        except NotEligibleError as e:
            return refusal("not_eligible", f"{kind} refused: {e}", 403)
        except (ValueError, KeyError, TypeError) as e:  # GovernanceError is a ValueError
            return refusal("refused", f"{kind} refused: {e}")
        return JSONResponse(result, status_code=201)

    async def proposals(request: Request) -> Response:
        return await submit(request, "proposal")

    async def votes(request: Request) -> Response:
        return await submit(request, "vote")

    async def ledger(request: Request) -> Response:
        """The balances, the chain head, and the last `limit` entries (of `node`, if given)."""
        node = request.query_params.get("node")
        try:
            limit = int(request.query_params.get("limit", LEDGER_PAGE))
        except ValueError:
            return refusal("bad_query", f"limit must be an integer, got {request.query_params['limit'][:40]!r}")
        limit = min(max(limit, 0), MAX_LEDGER_PAGE)
        entries = coordinator.store.ledger_entries()
        if node:
            entries = [e for e in entries if e["node"] == node]
        return JSONResponse({"balances": coordinator.store.balances(), "head": coordinator.governor.ledger.head,
                             "entries": entries[max(len(entries) - limit, 0):]})

    async def shard(request: Request) -> Response:
        try:
            index = int(request.path_params["index"])
            data = coordinator.corpus.shard(index)
        except (ValueError, IndexError) as e:
            return JSONResponse({"error": f"bad shard index: {e}"}, status_code=400)
        return Response(data, media_type="application/octet-stream")

    async def tokenizer(request: Request) -> Response:
        """The job's BPE tokenizer (server/tokenizer.py's file, Hugging Face's format), to turn its token ids into
        text and back; 404 for a bytes job, whose tokens are the text's UTF-8 bytes."""
        path = coordinator.data_dir / TOKENIZER_FILE
        if coordinator.job.tokenizer == "bytes" or not path.exists():
            return refusal("not_found", "this job's tokens are bytes (vocabulary 256): it has no tokenizer file", 404)
        return FileResponse(path, media_type="application/json")

    async def blob(request: Request) -> Response:
        """A chunk or manifest by its sha256 (shared/manifest.py): immutable, so any cache or CDN may keep it."""
        name = request.path_params["sha256"]
        if len(name) != 64 or not set(name) <= HEX_DIGITS:
            return refusal("bad_name", "a blob is named by its sha256: 64 lowercase hex characters")
        etag = f'"{name}"'
        headers = {"Cache-Control": "public, max-age=31536000, immutable", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        data = coordinator.blobs.get(name)
        if data is None:
            return refusal("not_found", "no such blob here (it may be of a model no longer served)", 404)
        return Response(data, media_type="application/octet-stream", headers=headers)

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
            await coordinator.shutdown()  # a round that is settling commits first
            await signaling.close()

    routes = [
        Route("/", index),
        Route("/dashboard", dashboard),
        Route("/leaderboard", leaderboard_page),
        Route("/api/status", status),
        Route("/api/leaderboard", leaderboard),
        Route("/api/shards/{index}", shard),
        Route("/api/tokenizer", tokenizer),
        Route("/api/blobs/{sha256}", blob),
        Route("/api/governance", governance),
        Route("/api/governance/proposals", proposals, methods=["POST"]),
        Route("/api/governance/votes", votes, methods=["POST"]),
        Route("/api/ledger", ledger),
        Route("/api/export/latest", latest_export_endpoint(coordinator)),
        Route("/metrics", metrics_endpoint(coordinator)),
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
