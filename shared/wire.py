"""The wire format: a versioned JSON envelope for control messages, and chunked binary payloads.

Every message type is written down once below, as a dataclass with its limits beside it. The decoder checks
sizes before parsing and declared lengths before allocating; it never trusts a count from the wire.

Framing. A link (a WebRTC data channel, or the signaling WebSocket as fallback) carries two kinds of frames:
  - text frames: one JSON object {"v": PROTOCOL_VERSION, "type": <message type>, ...fields}
  - binary frames: one chunk of a payload, CHUNK_MAGIC | transfer_id u32 LE | index u32 LE | data
A payload (model parameters, a pseudo-gradient) is announced by a PayloadHeader message with its total size,
chunk count and sha256, then sent as chunks of exactly CHUNK_DATA_BYTES (the last one shorter).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import struct
import time
import typing
from dataclasses import dataclass, field

from shared import PROTOCOL_VERSION

MAX_MESSAGE_BYTES = 262_144  # one WebRTC data-channel message: Chromium's and aiortc's limit
MAX_CONTROL_BYTES = 65_536  # one JSON control message, SDP included
CHUNK_MAGIC = b"SGC\x01"  # "swarmgrad chunk", format 1
CHUNK_HEADER = struct.Struct("<4sII")  # magic, transfer_id, index
CHUNK_DATA_BYTES = MAX_MESSAGE_BYTES - CHUNK_HEADER.size
MAX_PAYLOAD_BYTES = 1 << 30  # 1 GiB: far above any model we train here, far below memory exhaustion
MAX_TRANSFERS_IN_FLIGHT = 4  # per link and direction
MAX_STRING = 4_096  # default limit for a string field; SDP has its own
MAX_SDP = 60_000
MAX_CONTROL_RATE = 50.0  # control messages per second a peer may send on one link, on average ...
MAX_CONTROL_BURST = 200  # ... and at once (a round needs a handful; this only stops floods)
MAX_PEERS = 64  # peer links the tracker may advise in one RoundOpen
MAX_HAVE_NAMES = 900  # blob names in one Have: 64 hex and quotes each, well inside MAX_CONTROL_BYTES
MAX_JSON_DEPTH = 32  # nested arrays and objects; our deepest message needs 4, and json.loads recurses per level
MAX_DISPLAY_NAME = 40  # a node's chosen name or team (Hello.name, Hello.team), shown on the leaderboard
MAX_BLOB_URL = 128  # a node's direct blob server (Hello.blob_url): http://HOST:PORT, nothing else
# a name (or IPv4 address) or a bracketed IPv6 address, and a port; no user, path, query or fragment
_BLOB_URL = re.compile(r"http://(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")


class WireError(ValueError):
    """Input that does not follow the wire format. `code` names the kind of error for the peer and the logs."""

    code = "malformed"


class MalformedFrame(WireError):
    code = "malformed"


class VersionMismatch(WireError):
    code = "version"


class UnknownMessageType(WireError):
    code = "unknown_type"


class FieldError(WireError):
    code = "bad_field"


class LimitExceeded(WireError):
    code = "limit"


class ChecksumMismatch(WireError):
    code = "checksum"


# ---------------------------------------------------------------------------------------------------------
# Messages. Field annotations are the schema: the decoder checks every field's type from them, and
# `check()` adds each message's own limits.

MESSAGE_TYPES: dict[str, type["Message"]] = {}


def message(type_name: str):
    def register(cls):
        cls = dataclass(frozen=True)(cls)
        cls.TYPE = type_name
        MESSAGE_TYPES[type_name] = cls
        return cls

    return register


class Message:
    TYPE: typing.ClassVar[str] = ""

    def check(self) -> None:
        """Raise FieldError or LimitExceeded when a value is out of its limits. Override per message."""

    def to_dict(self) -> dict:
        d = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        d.update(dataclasses.asdict(self))
        return d

    def encode(self) -> str:
        text = json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)
        if len(text.encode()) > MAX_CONTROL_BYTES:
            raise LimitExceeded(f"{self.TYPE} message of {len(text)} bytes exceeds {MAX_CONTROL_BYTES}")
        return text


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise FieldError(what)


def _hex(value: str, length: int, name: str) -> None:
    _need(len(value) == length and all(c in "0123456789abcdef" for c in value), f"{name} must be {length} hex chars")


def check_display_name(value: str, what: str) -> None:
    """Raise FieldError unless `value` may be shown as a node's name or team: at most MAX_DISPLAY_NAME characters of
    printable text (no control characters, line breaks or other separators than the space), no outer spaces."""
    _need(len(value) <= MAX_DISPLAY_NAME, f"{what} must be at most {MAX_DISPLAY_NAME} characters, got {len(value)}")
    _need(value.isprintable(), f"{what} must be printable text: no control characters or line breaks")
    _need(value == value.strip(), f"{what} must not start or end with a space")


def check_blob_url(url: str, name: str = "blob_url") -> None:
    """Raise FieldError unless `url` is where a node serves its blobs directly: `http://HOST:PORT` (HOST a name, an
    IPv4 address or a bracketed IPv6 address; PORT 1-65535), at most MAX_BLOB_URL characters. It comes from another
    node, so nothing else is allowed in it: no https (the blobs are checked by hash, not by the channel), no user, no
    path, no query."""
    match = _BLOB_URL.fullmatch(url) if isinstance(url, str) and len(url) <= MAX_BLOB_URL else None
    _need(match is not None and 0 < int(match[1]) < 65536,
          f"{name} must be http://HOST:PORT, at most {MAX_BLOB_URL} characters")


# -- signaling (the WebSocket) ---------------------------------------------------------------------------


@message("challenge")
class Challenge(Message):
    """Coordinator -> node, first thing on a new WebSocket: sign this nonce in your Hello."""

    nonce: str
    coordinator_id: str

    def check(self):
        _hex(self.nonce, 64, "nonce")
        _hex(self.coordinator_id, 64, "coordinator_id")


NODE_KINDS = ("trainer", "browser")


@message("hello")
class Hello(Message):
    """Node -> coordinator: who I am, proven by signing the challenge (see `hello_signing_fields`)."""

    node_id: str
    kind: str
    nonce: str
    signature: str
    agent: str = ""  # free text: software and device, shown on the dashboard
    # where this node serves the blobs it holds over plain HTTP (GET /blobs/{sha256}; a trainer's --listen), for the
    # peers the tracker links it to; "" when it serves them only over its peer links
    blob_url: str = ""
    # the display name and team its owner chose (check_display_name); "" for none. Signed, so that nobody else can
    # put them on this node or take them off it
    name: str = ""
    team: str = ""

    def check(self):
        _hex(self.node_id, 64, "node_id")
        _need(self.kind in NODE_KINDS, f"kind must be one of {NODE_KINDS}")
        _hex(self.nonce, 64, "nonce")
        _hex(self.signature, 128, "signature")
        _need(len(self.agent) <= 200, "agent must be at most 200 characters")
        if self.blob_url:
            check_blob_url(self.blob_url)
        check_display_name(self.name, "name")
        check_display_name(self.team, "team")

    def signing_fields(self) -> dict:
        # name and team only when set, so that a hello from a node that has neither (or predates them) signs the
        # same bytes as before
        fields = {"node_id": self.node_id, "kind": self.kind, "nonce": self.nonce}
        fields.update({k: v for k, v in (("name", self.name), ("team", self.team)) if v})
        return fields


@message("welcome")
class Welcome(Message):
    """Coordinator -> node: admitted. `job` describes the model and training setup."""

    node_id: str
    coordinator_id: str
    job: dict
    round: int


@message("error")
class Error(Message):
    """Either way: what went wrong. `fatal` means the sender closes the connection next."""

    code: str
    message: str
    fatal: bool = False

    def check(self):
        _need(len(self.code) <= 64, "code too long")


@message("sdp")
class Sdp(Message):
    """Session description, relayed between any two peers by the coordinator (which is a peer too).

    Candidates travel inside the SDP (gathering completes before sending), so no trickle is needed.
    """

    src: str
    dst: str
    sdp_type: str
    sdp: str

    def check(self):
        _need(self.sdp_type in ("offer", "answer"), "sdp_type must be offer or answer")
        _need(len(self.sdp) <= MAX_SDP, f"sdp longer than {MAX_SDP}")
        _hex(self.dst, 64, "dst")


@message("ice")
class IceCandidate(Message):
    """One trickled ICE candidate, relayed like Sdp (for peers that trickle)."""

    src: str
    dst: str
    candidate: str
    sdp_mid: str = "0"
    sdp_mline_index: int = 0

    def check(self):
        _hex(self.dst, 64, "dst")


PATHS = ("webrtc", "websocket")


@message("path")
class PathSelect(Message):
    """Node -> coordinator: carry the round traffic over this path from now on."""

    path: str

    def check(self):
        _need(self.path in PATHS, f"path must be one of {PATHS}")


# -- rounds (the data channel, or the WebSocket fallback) ------------------------------------------------


@message("round_open")
class RoundOpen(Message):
    """Coordinator -> node: the assignment for round `round`: the model after `round` completed rounds. With
    overlapped rounds (config "overlap"), a round that opens while round `round - 1` still collects its updates
    trains on the model after `round - 1` rounds (a node starts it at once, without waiting for the verdict on its
    last update).

    `model_signature` is the coordinator's signature over signing_bytes("model", {"round", "model_hash"}).
    """

    round: int
    model_hash: str
    model_signature: str
    # inner_steps, lr, batch, seq_len, weight_decay, codec, deadline_seconds, overlap; and what a node plans its round from
    # (shared.agent.RoundPlanner): rules, the round_config rules in force, and params, the governed parameters, each
    # as GET /api/governance lists them
    config: dict
    shard: int
    deadline: float  # unix time by which the update must arrive
    # the name of the model's signed manifest (shared/manifest.py), whose chunks any holder serves by their sha256;
    # "" when the model is only sent in-band (ModelRequest)
    manifest: str = ""
    delta: str = ""  # the name of the signed manifest of the delta from the previous round's model to this one
    # the tracker's advice (server/coordinator/tracker.py): the node ids this node opens peer links to, and its seed
    # share: it fetches chunk i of a manifest from the coordinator at once when i % seed_slots == seed_slot, and any
    # other chunk from its peers first (the coordinator serves last). No peers and one slot is the star.
    peers: list = field(default_factory=list)
    seed_slot: int = 0
    seed_slots: int = 1
    # node id -> blob_url (Hello), for the peers this node links to (either way) that serve their blobs over HTTP:
    # a node that can fetches their blobs from there instead of over the data channel; browsers ignore it
    peer_urls: dict = field(default_factory=dict)

    def check(self):
        _need(self.round >= 0 and self.shard >= 0, "round and shard must be non-negative")
        _hex(self.model_hash, 64, "model_hash")
        _hex(self.model_signature, 128, "model_signature")
        for name in ("manifest", "delta"):
            if getattr(self, name):
                _hex(getattr(self, name), 64, name)
        _need(len(self.peers) <= MAX_PEERS, f"at most {MAX_PEERS} peers")
        for peer in self.peers:
            _need(isinstance(peer, str), "peers must be node ids")
            _hex(peer, 64, "peers[]")
        _need(0 <= self.seed_slot < self.seed_slots, "seed_slot must be in [0, seed_slots)")
        _need(len(self.peer_urls) <= MAX_PEERS, f"at most {MAX_PEERS} peer_urls")
        for peer, url in self.peer_urls.items():
            _hex(peer, 64, "peer_urls key")
            check_blob_url(url, "peer_urls[]")


@message("model_request")
class ModelRequest(Message):
    """Node -> peer: send me the parameters with this hash."""

    round: int
    model_hash: str

    def check(self):
        _hex(self.model_hash, 64, "model_hash")


PAYLOAD_KINDS = ("model", "update", "blob")  # a blob: a chunk or manifest, sent by a peer that holds it


@message("payload")
class PayloadHeader(Message):
    """Announces a binary payload that follows as `num_chunks` chunk frames of `transfer_id`."""

    transfer_id: int
    kind: str
    total_bytes: int
    num_chunks: int
    sha256: str
    meta: dict = field(default_factory=dict)

    def check(self):
        _need(0 <= self.transfer_id < 2**32, "transfer_id must fit in u32")
        _need(self.kind in PAYLOAD_KINDS, f"payload kind must be one of {PAYLOAD_KINDS}")
        if not 0 < self.total_bytes <= MAX_PAYLOAD_BYTES:
            raise LimitExceeded(f"payload of {self.total_bytes} bytes outside (0, {MAX_PAYLOAD_BYTES}]")
        _need(self.num_chunks == chunk_count(self.total_bytes),
              f"{self.total_bytes} bytes must travel as {chunk_count(self.total_bytes)} chunks, not {self.num_chunks}")
        _hex(self.sha256, 64, "sha256")


@message("update")
class Update(Message):
    """Node -> coordinator: a signed pseudo-gradient for `round`, whose bytes follow as payload `transfer_id`."""

    node_id: str
    round: int
    model_hash: str
    tokens: int
    inner_steps: int
    loss_first: float
    loss_last: float
    codec: dict  # shared.compress.CodecSpec.to_dict()
    num_values: int
    transfer_id: int
    payload_sha256: str
    payload_bytes: int
    signature: str
    seconds: float = 0.0  # wall time of the inner steps, for the autonomy loops

    def check(self):
        _hex(self.node_id, 64, "node_id")
        _hex(self.model_hash, 64, "model_hash")
        _hex(self.payload_sha256, 64, "payload_sha256")
        _hex(self.signature, 128, "signature")
        _need(self.round >= 0 and self.tokens >= 0 and self.inner_steps >= 0, "counts must be non-negative")
        _need(0 < self.num_values and 0 < self.payload_bytes <= MAX_PAYLOAD_BYTES, "sizes out of range")
        _need(math.isfinite(self.loss_first) and math.isfinite(self.loss_last), "losses must be finite")

    def signing_fields(self) -> dict:
        d = dataclasses.asdict(self)
        del d["signature"], d["seconds"], d["loss_first"], d["loss_last"]  # floats stay out of signed bytes
        return d


@message("update_result")
class UpdateResult(Message):
    """Coordinator -> node: whether its update for `round` was accepted, and if not, why (and which rule)."""

    round: int
    accepted: bool
    reason: str = ""
    rule: str = ""


@message("round_closed")
class RoundClosed(Message):
    """Coordinator -> every node: round `round` is committed; `val_loss` is the new model's validation loss."""

    round: int
    val_loss: float
    accepted: int
    rejected: int


@message("receipt")
class Receipt(Message):
    """Coordinator -> node: a ledger entry about this node (a reward or a slash), signed by the coordinator over
    shared.rewards.receipt_bytes(entry), so the node can verify it offline."""

    entry: dict
    signature: str

    def check(self):
        _hex(self.signature, 128, "signature")


@message("bye")
class Bye(Message):
    """Either way: leaving cleanly."""

    reason: str = ""


@message("round_stats")
class RoundStats(Message):
    """Node -> coordinator, once its round's model is held: how it got its models so far (cumulative bytes since the
    node started) and how busy it was in the round before this one (compute_seconds training, of wall_seconds from
    that round's assignment to this one's; both 0 when it did not train the round before), for /api/status.
    Self-reported: shown, never paid for."""

    round: int
    peers: int  # open peer links
    bytes_from_peers: int
    bytes_from_coordinator: int
    bytes_to_peers: int
    compute_seconds: float = 0.0
    wall_seconds: float = 0.0

    def check(self):
        _need(min(self.round, self.peers, self.bytes_from_peers, self.bytes_from_coordinator,
                  self.bytes_to_peers) >= 0, "counts must be non-negative")
        _need(0.0 <= self.compute_seconds <= max(self.wall_seconds, 0.0) + 1.0, "compute_seconds must lie in "
              "[0, wall_seconds]")


NODE_STATES = ("active", "paused", "finishing")


@message("node_state")
class NodeState(Message):
    """Node -> coordinator, over its admitted link (so bound to its signed session): "paused" (assign it nothing and
    wait for nothing from it, without penalty, until "active" again) or "finishing" (it sends its update for the
    round in hand, then leaves)."""

    state: str

    def check(self):
        _need(self.state in NODE_STATES, f"state must be one of {NODE_STATES}")


# -- between two nodes (a peer link: shared/swarm.py) ------------------------------------------------------


@message("have")
class Have(Message):
    """Node -> peer: blobs (chunks and manifests, by sha256) this node now holds and serves."""

    names: list

    def check(self):
        _need(0 < len(self.names) <= MAX_HAVE_NAMES, f"have lists 1 to {MAX_HAVE_NAMES} names")
        for name in self.names:
            _need(isinstance(name, str), "names must be strings")
            _hex(name, 64, "names[]")


@message("want")
class Want(Message):
    """Node -> peer: send me this blob. The answer is a "blob" payload whose sha256 is `name`, or Missing."""

    name: str

    def check(self):
        _hex(self.name, 64, "name")


@message("missing")
class Missing(Message):
    """Node -> peer: I do not hold this blob (any more)."""

    name: str

    def check(self):
        _hex(self.name, 64, "name")


# ---------------------------------------------------------------------------------------------------------
# Decoding control messages


def _check_type(value: object, hint: object, name: str) -> object:
    if hint is bool:
        _need(isinstance(value, bool), f"{name} must be a boolean")
    elif hint is int:
        _need(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer")
        _need(-(2**53) <= value <= 2**53, f"{name} out of range")
    elif hint is float:
        _need(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} must be a number")
        value = float(value)
        _need(math.isfinite(value), f"{name} must be finite")
    elif hint is str:
        _need(isinstance(value, str), f"{name} must be a string")
        _need(len(value) <= max(MAX_STRING, MAX_SDP if name == "sdp.sdp" else 0), f"{name} too long")
    elif hint is dict:
        _need(isinstance(value, dict), f"{name} must be an object")
    elif hint is list:
        _need(isinstance(value, list), f"{name} must be an array")
    else:  # pragma: no cover - a message declared a type this decoder does not know
        raise TypeError(f"unsupported field type {hint!r} for {name}")
    return value


def decode_message(frame: str | bytes) -> Message:
    """Parse one text frame into its message dataclass, or raise a WireError subclass saying what is wrong."""
    obj = parse_json(frame)
    if not isinstance(obj, dict):
        raise MalformedFrame("a message must be a JSON object")
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # true and 1.0 equal 1 in Python; not on the wire
        raise VersionMismatch(f"protocol version {_show(version)}; this peer speaks {PROTOCOL_VERSION} (an integer)")
    type_name = obj.get("type")
    cls = MESSAGE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise UnknownMessageType(f"unknown message type {_show(type_name)}; known: {sorted(MESSAGE_TYPES)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in obj:
            kwargs[f.name] = _check_type(obj[f.name], hints[f.name], f"{cls.TYPE}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FieldError(f"{cls.TYPE} is missing field {f.name!r}")
    extra = set(obj) - {"v", "type"} - {f.name for f in dataclasses.fields(cls)}
    if extra:
        raise FieldError(f"{cls.TYPE} has unknown fields {_show(sorted(extra))}")
    msg = cls(**kwargs)
    msg.check()
    return msg


def _show(value: object, limit: int = 60) -> str:
    """A value from the wire as it may appear in an error message: repr (so escaped), and cut to `limit` chars."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Outside strings, JSON nests only through brackets. A string runs from a quote to the next unescaped quote; an
# unterminated one runs to the end. The pattern never backtracks (the closing quote is optional), so it is linear.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")
_JSON_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how JSON writes a UTF-16 surrogate, paired or not


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in the JSON `text` (0 for a scalar); brackets in strings do not count.

    Exact for every prefix that json.loads would accept, so a check of this bounds json.loads's recursion.
    """
    brackets = _JSON_BRACKET.findall(_JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_JSON_STEP.__getitem__, brackets), initial=0))


def parse_json(data: str | bytes, max_bytes: int = MAX_CONTROL_BYTES, max_depth: int = MAX_JSON_DEPTH) -> object:
    """One JSON document from a peer, or a WireError: LimitExceeded beyond `max_bytes` of UTF-8 or `max_depth`
    levels of nesting (checked before parsing, so json.loads never recurses deeply), MalformedFrame for text
    that is not UTF-8 or not JSON, FieldError for a string that is not valid UTF-8 (JSON's "\\ud800" escape
    can name a lone surrogate, which no UTF-8 text can carry and which fails later, wherever it is encoded).

    Every JSON input from the network goes through here: signaling frames, data-channel frames, HTTP bodies.
    """
    text = _utf8_text(data, max_bytes)
    if text.count("[") + text.count("{") > max_depth and json_depth(text) > max_depth:
        raise LimitExceeded(f"JSON nested more than {max_depth} levels deep")
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise MalformedFrame(f"not a JSON message: {e}") from None
    if _SURROGATE_ESCAPE.search(text):
        where = _lone_surrogate(obj, "")
        if where is not None:
            raise FieldError(f"the string at {where or 'the top level'} is not valid UTF-8 (it holds a lone "
                             "surrogate); send text as UTF-8")
    return obj


def _utf8_text(data: str | bytes, max_bytes: int) -> str:
    """`data` as text, if it is at most `max_bytes` of valid UTF-8."""
    if len(data) > max_bytes:  # a character is at least one byte: no need to encode a huge text to refuse it
        raise LimitExceeded(f"JSON text of {len(data)} bytes or more exceeds {max_bytes}")
    try:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        text = data if isinstance(data, str) else raw.decode("utf-8")
    except UnicodeError as e:  # invalid bytes, or a str holding a lone surrogate
        raise MalformedFrame(f"not valid UTF-8 text: {e}") from None
    if len(raw) > max_bytes:
        raise LimitExceeded(f"JSON text of {len(raw)} bytes exceeds {max_bytes}")
    return text


def _lone_surrogate(value: object, path: str) -> str | None:
    """Where in `value` the first string (value or key) that cannot be encoded as UTF-8 is, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        children: typing.Iterable[tuple[object, object]] = value.items()
        for key in value:
            if _lone_surrogate(key, "") is not None:
                return f"{path}[{_show(key, 40)}] (its key)"
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        return None
    for key, item in children:
        where = _lone_surrogate(item, f"{path}[{_show(key, 40)}]")
        if where is not None:
            return where
    return None


# ---------------------------------------------------------------------------------------------------------
# Chunked payloads


def chunk_count(total_bytes: int) -> int:
    return max(1, -(-total_bytes // CHUNK_DATA_BYTES))


def payload_frames(transfer_id: int, kind: str, data: bytes | memoryview, meta: dict | None = None):
    """The PayloadHeader for `data` and its chunk frames (a generator: memory stays at one chunk)."""
    view = memoryview(data).cast("B")
    header = PayloadHeader(transfer_id, kind, len(view), chunk_count(len(view)), hashlib.sha256(view).hexdigest(),
                           dict(meta or {}))
    header.check()

    def chunks():
        for i in range(header.num_chunks):
            part = view[i * CHUNK_DATA_BYTES : (i + 1) * CHUNK_DATA_BYTES]
            yield CHUNK_HEADER.pack(CHUNK_MAGIC, transfer_id, i) + part.tobytes()

    return header, chunks()


def parse_chunk(frame: bytes | memoryview) -> tuple[int, int, memoryview]:
    """(transfer_id, index, data) of one binary frame; raises MalformedFrame or LimitExceeded."""
    view = memoryview(frame).cast("B")
    if len(view) > MAX_MESSAGE_BYTES:
        raise LimitExceeded(f"binary frame of {len(view)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if len(view) < CHUNK_HEADER.size:
        raise MalformedFrame(f"binary frame of {len(view)} bytes is shorter than a chunk header")
    magic, transfer_id, index = CHUNK_HEADER.unpack_from(view)
    if magic != CHUNK_MAGIC:
        raise MalformedFrame(f"bad chunk magic {bytes(magic)!r}")
    return transfer_id, index, view[CHUNK_HEADER.size :]


class _Transfer:
    def __init__(self, header: PayloadHeader):
        self.header = header
        self.buffer = bytearray(header.total_bytes)
        self.seen = bytearray(header.num_chunks)
        self.received = 0


class PayloadAssembler:
    """Reassembles chunked payloads on one link, checking every chunk against its header.

    `max_bytes` bounds what this receiver accepts (e.g. the model size it expects), so a peer cannot make it
    allocate more. A failed transfer is dropped whole; other transfers on the link are unaffected.
    """

    def __init__(self, max_bytes: int = MAX_PAYLOAD_BYTES, max_in_flight: int = MAX_TRANSFERS_IN_FLIGHT):
        self.max_bytes = max_bytes
        self.max_in_flight = max_in_flight
        self._transfers: dict[int, _Transfer] = {}

    def begin(self, header: PayloadHeader) -> None:
        header.check()
        if header.total_bytes > self.max_bytes:
            raise LimitExceeded(f"payload of {header.total_bytes} bytes exceeds this receiver's {self.max_bytes}")
        if header.transfer_id in self._transfers:
            raise FieldError(f"transfer {header.transfer_id} is already in progress")
        if len(self._transfers) >= self.max_in_flight:
            raise LimitExceeded(f"more than {self.max_in_flight} transfers in flight")
        self._transfers[header.transfer_id] = _Transfer(header)

    def add_chunk(self, frame: bytes | memoryview) -> tuple[PayloadHeader, bytes] | None:
        """Take one chunk frame; returns (header, payload) when the payload is complete and its sha256 matches."""
        transfer_id, index, data = parse_chunk(frame)
        t = self._transfers.get(transfer_id)
        if t is None:
            raise FieldError(f"chunk for unknown transfer {transfer_id}")
        try:
            n = t.header.num_chunks
            if index >= n:
                raise FieldError(f"chunk index {index} out of range for {n} chunks")
            if t.seen[index]:
                raise FieldError(f"duplicate chunk {index} of transfer {transfer_id}")
            start = index * CHUNK_DATA_BYTES
            expected = min(CHUNK_DATA_BYTES, t.header.total_bytes - start)
            if len(data) != expected:
                raise FieldError(f"chunk {index} has {len(data)} bytes, expected {expected}")
        except WireError:
            del self._transfers[transfer_id]
            raise
        t.buffer[start : start + expected] = data
        t.seen[index] = 1
        t.received += 1
        if t.received < n:
            return None
        del self._transfers[transfer_id]
        if hashlib.sha256(t.buffer).hexdigest() != t.header.sha256:
            raise ChecksumMismatch(f"payload {transfer_id} does not match its sha256")
        return t.header, bytes(t.buffer)

    def abort(self, transfer_id: int) -> None:
        self._transfers.pop(transfer_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._transfers)


class FrameReceiver:
    """One link's incoming frames as messages and whole payloads; raises WireError on bad input.

    `max_payload_bytes` is what this side expects at most (e.g. one model), the bound on what a peer can make
    it allocate. Every peer uses this one class: the coordinator, the trainer and the browser node.
    """

    def __init__(self, max_payload_bytes: int, rate: float = MAX_CONTROL_RATE, burst: int = MAX_CONTROL_BURST,
                 clock=time.monotonic) -> None:
        self.assembler = PayloadAssembler(max_payload_bytes)
        self.bytes_received = 0
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens, self._refilled = float(burst), clock()

    def _take_token(self) -> None:
        """A token bucket over control messages; binary chunks are bounded by their PayloadHeader instead."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            raise LimitExceeded(f"more than {self.rate:g} control messages per second (burst {self.burst})")
        self._tokens -= 1

    def feed(self, frame: str | bytes) -> Message | tuple[PayloadHeader, bytes] | None:
        """One frame in; a Message, a completed (header, payload), or None while a payload is incomplete."""
        self.bytes_received += len(frame)
        if isinstance(frame, str):
            self._take_token()
            msg = decode_message(frame)
            if isinstance(msg, PayloadHeader):
                self.assembler.begin(msg)
                return None
            return msg
        return self.assembler.add_chunk(frame)
