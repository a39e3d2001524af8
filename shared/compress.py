"""Codecs for pseudo-gradients on the wire: the codec id and its parameters travel with every update.

Reference implementations in plain Python (array/struct); the trainer encodes with torch and the coordinator
decodes with numpy (server/codecs.py), and tests prove they agree byte for byte. Never trust a length from
the wire without checking it against the codec's own arithmetic, and never allocate more than spec and n allow.

Every codec encodes n float32 values; everything on the wire is little-endian. The codecs:

fp32  {}                     4n bytes: the values as float32.
fp16  {}                     2n bytes: IEEE half precision, rounded to nearest, ties to even. A value whose
                             rounding overflows half precision (|x| >= 65520) raises CodecError.
int8  {"block": B}           Blockwise absmax quantization, B = 256 by default (1 <= B <= MAX_INT8_BLOCK).
                             The rule is kernels/quant.py's (its docstring is the spec; the browser's WGSL
                             kernel follows it, and tests/test_compress.py proves this codec equals it byte
                             for byte at B = 256). Values are cut into ceil(n / B) blocks of B (the last may be
                             shorter); per block, with amax = max_j |x_j|:
                                 amax < 2^-100 (INT8_MIN_BLOCK_AMAX): a zero block, scale = 0, every q_j = 0
                                 otherwise: scale = float32(amax / 127), correctly rounded
                                            q_j = round_half_away(127 x_j / amax) of the EXACT quotient,
                                            clamped to [-127, 127] (2.5 -> 3, -2.5 -> -3)
                             The exact quotient (not x / scale) is what a GPU can reproduce: WGSL's `/` is
                             only 2.5-ulp accurate, but 127 |x| against (q +- 1/2) amax compares exactly.
                             In float64, 127.0 * x / amax rounds to a half-integer only when it is one.
                             Wire: the ceil(n / B) float32 scales first, then the n int8 q's:
                             4 * ceil(n / B) + n bytes. Decoding gives q_j * scale, a float32 product.
topk  {"k": K} or            The k values of largest |x|, ties to the lower index, with
      {"fraction": F}        k = min(n, K), or k = min(n, max(1, floor(F * n + 0.5))) with F * n in IEEE
      (default F = 0.02)     double and 0 < F <= 1; k = 0 when n = 0. Wire: uint32 count (must equal k),
                             k uint32 indices strictly ascending and < n, then the k float32 values:
                             4 + 8k bytes. Positions not sent decode to 0. The encoder keeps what it did
                             not send (ErrorFeedback) and adds it to the next round's values.
sparseloco                   Chunked top-k with 2-bit values (SparseLoCo, arXiv 2508.15706; Covenant-72B sent
  {"chunk": C, "k": K,       top-64 of every 4096 at 2 bits). Defaults C = 4096, K = 64, bits = 2 (the only
   "bits": 2}                width); 1 <= C <= MAX_SPARSELOCO_CHUNK, 1 <= K <= C. Values are cut into
                             ceil(n / C) chunks of C (the last may be shorter, of length L); chunk c keeps
                             k_c = min(K, L_c) values. Within a chunk the values are ranked by |x| descending
                             (comparing float32 magnitudes), ties to the lower index; ranks 0 .. k_c - 1 are sent.
                             Of those, the first h = k_c // 2 are "high" (equal magnitudes split by index, as
                             in the selection), the rest "low". Two float32 levels per chunk, each the magnitude
                             of one sent value (no arithmetic, so every encoder and the GPU pick the same
                             bits): hi = |x| at rank h // 2 (the high group's median),
                             lo = |x| at rank h + (k_c - h) // 2 (the low group's median). A value's 2-bit code:
                             bit 0 = 1 when x < 0 (so -0.0 counts as positive), bit 1 = 1 when it is high; it
                             decodes to +-hi or +-lo, and every value not sent to 0. The paper's quantiser maps
                             values to 4 bins of a statistical range; this one keeps its 2 bits but takes its
                             levels from order statistics, which a GPU reproduces exactly.
                             Wire: the chunks' levels as float32 pairs (hi, lo), 8 per chunk; then the
                             S = sum k_c offsets within their chunks, chunk after chunk and ascending within
                             each, b = max(1, bit_length(C - 1)) bits each (12 at C = 4096); then the S codes,
                             2 bits each, in the same order. Each bitstream is packed least significant bit
                             first (value j at bits j*b .. j*b + b - 1 of the little-endian stream) and zero-
                             padded to a whole byte: 8 * chunks + ceil(S * b / 8) + ceil(S / 4) bytes, 120 per
                             full chunk at the defaults (0.0293 bytes per value, 136x fewer than fp32). A
                             decoder refuses levels that are not finite or not hi >= lo >= 0 (hi == lo when
                             h = 0), offsets not ascending within their chunk or beyond its length, a chunk
                             whose count of high codes is not h, and non-zero padding bits. The encoder keeps
                             what it did not send, and the quantisation error of what it did (ErrorFeedback;
                             the paper also decays that residual and drops the outer momentum, where a job
                             keeps plain error feedback and its outer Nesterov step).

Any codec also takes {"deflate": true}: a lossless stage after the codec. The codec's bytes (the "raw"
payload, encoded_size(spec, n) of them) go on the wire as one raw DEFLATE stream (RFC 1951, no zlib header:
the wire already carries the payload's sha256). The encoder uses zlib with Huffman coding only
(Z_HUFFMAN_ONLY): quantised levels and index bytes repeat as symbols rather than as strings, and it runs
about twice as fast as zlib level 1 for the same size. A decoder accepts any valid stream, from any
deflate implementation and at any level, that inflates to exactly the raw size, and rejects one of more
than max_wire_size(spec, n) bytes before inflating it. It is what lets int8 go past the 4x that a scale per
block makes impossible (4B / (B + 4) = 3.94x at B = 256): measured on the tiny and small models'
pseudo-gradients, int8 with deflate sends 4.15x and 4.05x fewer bytes than fp32.

Encoders reject NaN and infinity (CodecError). Decoders return what the bytes say; the coordinator's
aggregation rejects non-finite updates before aggregating.

Jobs name their codec as a string, `name[:key=value,...]` (parse_codec): "int8" is int8 with the job
defaults in CODEC_DEFAULTS (a block of 256 and deflate), "topk:fraction=0.01,deflate=false" overrides them.
"""

from __future__ import annotations

import heapq
import math
import operator
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass, field

DEFAULT_INT8_BLOCK = 256
MAX_INT8_BLOCK = 1 << 20
"""A block longer than this buys nothing (one scale per MiB of values is already free) and hides mistakes."""

DEFAULT_TOPK_FRACTION = 0.02
"""Keeps 2% of the values at 8 bytes each: 25x fewer bytes than fp32."""

DEFAULT_SPARSELOCO_CHUNK = 4096
DEFAULT_SPARSELOCO_K = 64
SPARSELOCO_BITS = 2
"""The only value width sparseloco has; "bits" travels in its params so that another width is a new spec, not a
silent change of meaning."""
MAX_SPARSELOCO_CHUNK = 4096
"""One GPU workgroup ranks a whole chunk in its registers (256 invocations x 16 values, kernels/sparseloco.wgsl)."""

INT8_MIN_BLOCK_AMAX = 2.0**-100
"""A block whose largest magnitude is below this is sent as zeros; the threshold sits far above the
subnormals a GPU may flush to zero, so flushing never changes a byte (kernels/quant.py's MIN_BLOCK_AMAX)."""

INT8_LEVELS = 127
"""q ranges over [-127, 127]; -128 never comes out of the encoder, so a decoder that sees it rejects the payload."""

FP16_MAX = 65504.0


class CodecError(ValueError):
    """Encoded bytes do not fit the declared codec, parameters or element count."""


@dataclass(frozen=True)
class CodecSpec:
    """Which codec, with which parameters: what an Update declares about its payload."""

    name: str
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict) -> "CodecSpec":
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise CodecError(f"codec spec must be an object with a string 'name', got {d!r}")
        params = d.get("params", {})
        if not isinstance(params, dict):
            raise CodecError("codec params must be an object")
        return cls(d["name"], params)


CODECS = ("fp32", "fp16", "int8", "topk", "sparseloco")

CODEC_DEFAULTS: dict[str, dict] = {
    "fp32": {},
    "fp16": {},
    "int8": {"block": DEFAULT_INT8_BLOCK, "deflate": True},
    "topk": {"fraction": DEFAULT_TOPK_FRACTION, "deflate": True},
    "sparseloco": {"chunk": DEFAULT_SPARSELOCO_CHUNK, "k": DEFAULT_SPARSELOCO_K, "bits": SPARSELOCO_BITS},
}
"""What a job's bare codec name means (parse_codec). On the wire every parameter is explicit, and an absent
"deflate" means false; a job turns deflate on for the lossy codecs because it is lossless and their bytes
compress (in the simulator's tiny-model runs, int8 goes from 3.94x to 4.35x fewer bytes than fp32 and top-k
from 25x to 30.9x); fp32 and fp16 barely do, and neither does sparseloco, whose bits are already packed."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def deflated(spec: CodecSpec) -> bool:
    """Whether the spec asks for the deflate stage, after checking that its flag is a boolean."""
    flag = spec.params.get("deflate", False)
    if not isinstance(flag, bool):
        raise CodecError(f"deflate must be true or false, got {flag!r}")
    return flag


def _codec_params(spec: CodecSpec) -> dict:
    """The codec's own parameters: its params less the deflate stage's flag (checked)."""
    deflated(spec)
    return {k: v for k, v in spec.params.items() if k != "deflate"}


def _check_n(n: int) -> None:
    if not _is_int(n) or n < 0:
        raise CodecError(f"element count must be a non-negative integer, got {n!r}")


def int8_block(spec: CodecSpec) -> int:
    """The int8 codec's block size B, after checking the spec's params."""
    params = _codec_params(spec)
    unknown = set(params) - {"block"}
    if unknown:
        raise CodecError(f"int8 takes only 'block' (and 'deflate'), got {sorted(unknown)}")
    block = params.get("block", DEFAULT_INT8_BLOCK)
    if not _is_int(block) or not 1 <= block <= MAX_INT8_BLOCK:
        raise CodecError(f"int8 block must be an integer in [1, {MAX_INT8_BLOCK}], got {block!r}")
    return block


def topk_count(spec: CodecSpec, n: int) -> int:
    """The k that the topk codec keeps of n values, after checking the spec's params."""
    _check_n(n)
    params = _codec_params(spec)
    if set(params) not in (set(), {"k"}, {"fraction"}):
        raise CodecError(f"topk takes one of 'k' or 'fraction' (or neither, and 'deflate'), got {sorted(params)}")
    if "k" in params:
        k = params["k"]
        if not _is_int(k) or k < 1:
            raise CodecError(f"topk k must be a positive integer, got {k!r}")
        return min(n, k)
    fraction = params.get("fraction", DEFAULT_TOPK_FRACTION)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise CodecError(f"topk fraction must be in (0, 1], got {fraction!r}")
    if n == 0:
        return 0
    # floor(x + 0.5) rather than round(): Python rounds halves to even, JavaScript's Math.round up.
    return min(n, max(1, math.floor(fraction * n + 0.5)))


@dataclass(frozen=True)
class SparseLoCoLayout:
    """Where everything of a sparseloco payload of n values lies: the arithmetic every encoder and decoder shares."""

    n: int
    chunk: int  # C
    k: int  # K
    index_bits: int  # b: the width of an offset within a chunk
    chunks: int

    def length(self, c: int) -> int:
        """How many values chunk c holds (C, but the last may be shorter)."""
        return min(self.chunk, self.n - c * self.chunk)

    def kept(self, c: int) -> int:
        """k_c: how many values chunk c sends."""
        return min(self.k, self.length(c))

    @property
    def selected(self) -> int:
        """S: how many values the payload carries."""
        return 0 if self.chunks == 0 else (self.chunks - 1) * self.k + self.kept(self.chunks - 1)

    @property
    def level_bytes(self) -> int:
        return 8 * self.chunks

    @property
    def index_bytes(self) -> int:
        return -(-self.selected * self.index_bits // 8)

    @property
    def code_bytes(self) -> int:
        return -(-self.selected * SPARSELOCO_BITS // 8)

    @property
    def size(self) -> int:
        return self.level_bytes + self.index_bytes + self.code_bytes


def sparseloco_ranks(kept: int) -> tuple[int, int, int]:
    """(h, rank of hi, rank of lo) for a chunk that sends `kept` values: the first h ranks are high, and each
    level is the magnitude of the median of its group."""
    high = kept // 2
    return high, high // 2, high + (kept - high) // 2


def sparseloco_layout(spec: CodecSpec, n: int) -> SparseLoCoLayout:
    """The sparseloco layout of n values under `spec`, after checking its params."""
    _check_n(n)
    params = _codec_params(spec)
    unknown = set(params) - {"chunk", "k", "bits"}
    if unknown:
        raise CodecError(f"sparseloco takes 'chunk', 'k' and 'bits' (and 'deflate'), got {sorted(unknown)}")
    chunk = params.get("chunk", DEFAULT_SPARSELOCO_CHUNK)
    if not _is_int(chunk) or not 1 <= chunk <= MAX_SPARSELOCO_CHUNK:
        raise CodecError(f"sparseloco chunk must be an integer in [1, {MAX_SPARSELOCO_CHUNK}], got {chunk!r}")
    k = params.get("k", DEFAULT_SPARSELOCO_K)
    if not _is_int(k) or not 1 <= k <= chunk:
        raise CodecError(f"sparseloco k must be an integer in [1, chunk = {chunk}], got {k!r}")
    bits = params.get("bits", SPARSELOCO_BITS)
    if not _is_int(bits) or bits != SPARSELOCO_BITS:
        raise CodecError(f"sparseloco bits must be {SPARSELOCO_BITS} (sign and high/low), got {bits!r}")
    return SparseLoCoLayout(n, chunk, k, max(1, (chunk - 1).bit_length()), -(-n // chunk))


def _no_params(spec: CodecSpec) -> None:
    params = _codec_params(spec)
    if params:
        raise CodecError(f"{spec.name} takes no params but 'deflate', got {sorted(params)}")


def encoded_size(spec: CodecSpec, n: int) -> int:
    """Exact bytes that `n` values take under `spec` before the deflate stage (the raw payload)."""
    _check_n(n)
    if spec.name == "fp32":
        _no_params(spec)
        return 4 * n
    if spec.name == "fp16":
        _no_params(spec)
        return 2 * n
    if spec.name == "int8":
        return 4 * -(-n // int8_block(spec)) + n
    if spec.name == "topk":
        return 4 + 8 * topk_count(spec, n)
    if spec.name == "sparseloco":
        return sparseloco_layout(spec, n).size
    raise CodecError(f"unknown codec {spec.name!r}; known: {', '.join(CODECS)}")


def max_wire_size(spec: CodecSpec, n: int) -> int:
    """The most bytes a payload of `n` values may take on the wire: the raw size, or with deflate zlib's
    compressBound of it (stored blocks' worst case), so that a decoder rejects a bloated payload unread."""
    raw = encoded_size(spec, n)
    if not deflated(spec):
        return raw
    return raw + (raw >> 12) + (raw >> 14) + (raw >> 25) + 13


def check_wire_size(spec: CodecSpec, n: int, size: int) -> None:
    """Raise CodecError unless `size` bytes can hold `n` values under `spec` (exactly, without deflate)."""
    if deflated(spec):
        bound = max_wire_size(spec, n)
        if not 0 < size <= bound:
            raise CodecError(f"deflated {spec.name} payload of {n} values must be 1 to {bound} bytes, got {size}")
        return
    expected = encoded_size(spec, n)
    if size != expected:
        raise CodecError(f"{spec.name} payload of {n} values must be {expected} bytes, got {size}")


def pack(spec: CodecSpec, raw: bytes) -> bytes:
    """The wire bytes for a codec's raw payload: deflated when the spec asks for it."""
    if not deflated(spec):
        return raw
    stream = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return stream.compress(raw) + stream.flush()


def unpack(spec: CodecSpec, data: bytes, n: int) -> bytes:
    """The codec's raw payload from wire bytes, checked: exactly encoded_size(spec, n) bytes come out, from
    a payload no longer than max_wire_size, so neither a short stream nor a deflate bomb gets through."""
    check_wire_size(spec, n, len(data))
    if not deflated(spec):
        return bytes(data)
    raw_size = encoded_size(spec, n)
    stream = zlib.decompressobj(-15)
    try:
        raw = stream.decompress(data, max(raw_size, 1))  # max_length=0 would mean "no limit"
        if not stream.eof and len(raw) == raw_size:  # the output is full; only the end of the stream may remain
            raw += stream.decompress(stream.unconsumed_tail, 1)
    except zlib.error as e:
        raise CodecError(f"deflated {spec.name} payload is not a valid deflate stream: {e}") from None
    if len(raw) != raw_size or not stream.eof or stream.unused_data:
        raise CodecError(f"deflated {spec.name} payload must inflate to exactly {raw_size} bytes and end there")
    return raw


def parse_codec(text: str) -> CodecSpec:
    """A job's codec option, `name[:key=value,...]`, as a spec: CODEC_DEFAULTS[name] updated by the pairs.

    Values are JSON-like scalars: true/false, integers, decimals. The spec is checked (encoded_size) before
    it is returned, so a bad option fails where it is given, not when the first update arrives.
    """
    name, _, rest = str(text).strip().partition(":")
    if name not in CODEC_DEFAULTS:
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(CODECS)}")
    params = dict(CODEC_DEFAULTS[name])
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise CodecError(f"codec option {item!r} is not key=value (in {text!r})")
        params[key] = _parse_scalar(value)
    if name == "topk" and "k" in params:
        params.pop("fraction", None)  # k given: the default fraction no longer applies
    spec = CodecSpec(name, params)
    encoded_size(spec, 1)
    return spec


def _parse_scalar(value: str):
    if value in ("true", "false"):
        return value == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        raise CodecError(f"codec option value {value!r} is not true, false or a number") from None
    if not math.isfinite(number):
        raise CodecError(f"codec option value {value!r} is not finite")
    return number


def format_codec(spec: CodecSpec) -> str:
    """The spec as a job's codec option (parse_codec's inverse for every spec it returns)."""
    if not spec.params:
        return spec.name
    items = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(spec.params.items()))
    return f"{spec.name}:{items}"


def _f32(values) -> array:
    """Values as array('f'), rejecting NaN and infinity."""
    a = values if isinstance(values, array) and values.typecode == "f" else array("f", values)
    # One C-level pass first: float32 values cannot overflow a float64 sum, so the sum is finite exactly
    # when every value is (this keeps Pyodide from a Python-level loop over millions of values).
    if not math.isfinite(sum(a)):
        for i, x in enumerate(a):
            if not math.isfinite(x):
                raise CodecError(f"value {i} is {x}; only finite values can be encoded")
    return a


def _le(a: array) -> bytes:
    if sys.byteorder != "little":
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def _from_le(typecode: str, data: bytes) -> array:
    a = array(typecode)
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def _round_half_away(x: float) -> int:
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def _int8_encode(values: array, block: int) -> bytes:
    n = len(values)
    scales = array("f")
    q = array("b")
    for start in range(0, n, block):
        chunk = values[start : start + block]
        amax = max(abs(x) for x in chunk)
        if amax < INT8_MIN_BLOCK_AMAX:
            scales.append(0.0)
            q.extend([0] * len(chunk))
            continue
        scales.append(amax / INT8_LEVELS)  # array("f") rounds the float64 quotient to the nearest float32
        q.extend(max(-INT8_LEVELS, min(INT8_LEVELS, _round_half_away(INT8_LEVELS * x / amax))) for x in chunk)
    return _le(scales) + q.tobytes()


def _topk_indices(values: array, k: int) -> list[int]:
    return sorted(heapq.nsmallest(k, range(len(values)), key=lambda i: (-abs(values[i]), i)))


def _pack_bits(values: list[int], width: int) -> bytes:
    """Unsigned values of `width` bits each as one little-endian bitstream, zero-padded to a whole byte. Eight
    values fill exactly `width` bytes, so the stream is built 8 values at a time: linear in the values."""
    out = bytearray()
    for start in range(0, len(values), 8):
        group = 0
        for j, value in enumerate(values[start : start + 8]):
            group |= value << (j * width)
        out += group.to_bytes(width, "little")
    return bytes(out[: -(-len(values) * width // 8)])


def _unpack_bits(data: bytes, count: int, width: int, what: str) -> list[int]:
    """_pack_bits' inverse for `count` values; raises CodecError when a padding bit is set."""
    mask = (1 << width) - 1
    values: list[int] = []
    for start in range(0, count, 8):
        group = int.from_bytes(data[start // 8 * width : start // 8 * width + width], "little")
        m = min(8, count - start)
        values.extend((group >> (j * width)) & mask for j in range(m))
        if group >> (m * width):
            raise CodecError(f"sparseloco {what} stream has padding bits set after its last value")
    return values


def _sparseloco_encode(values: array, layout: SparseLoCoLayout) -> bytes:
    levels = array("f")
    offsets: list[int] = []
    codes: list[int] = []
    for c in range(layout.chunks):
        chunk = values[c * layout.chunk : c * layout.chunk + layout.length(c)]
        kept = layout.kept(c)
        ranked = heapq.nsmallest(kept, range(len(chunk)), key=lambda i: (-abs(chunk[i]), i))  # ties: lower index
        high, hi_rank, lo_rank = sparseloco_ranks(kept)
        levels.extend((abs(chunk[ranked[hi_rank]]), abs(chunk[ranked[lo_rank]])))
        is_high = set(ranked[:high])
        for i in sorted(ranked):
            offsets.append(i)
            codes.append((chunk[i] < 0) | (i in is_high) << 1)
    return _le(levels) + _pack_bits(offsets, layout.index_bits) + _pack_bits(codes, SPARSELOCO_BITS)


def _sparseloco_decode(data: bytes, layout: SparseLoCoLayout) -> array:
    levels = _from_le("f", data[: layout.level_bytes])
    start = layout.level_bytes
    offsets = _unpack_bits(data[start : start + layout.index_bytes], layout.selected, layout.index_bits, "offset")
    codes = _unpack_bits(data[start + layout.index_bytes :], layout.selected, SPARSELOCO_BITS, "code")
    out = array("f", bytes(4 * layout.n))
    j = 0
    for c in range(layout.chunks):
        hi, lo = levels[2 * c], levels[2 * c + 1]
        kept, length, base = layout.kept(c), layout.length(c), c * layout.chunk
        high = sparseloco_ranks(kept)[0]
        if not (math.isfinite(hi) and hi >= lo >= 0) or (high == 0 and hi != lo):
            raise CodecError(f"sparseloco chunk {c} has levels ({hi}, {lo}); they are finite, hi >= lo >= 0, "
                             f"and equal when no value is high")
        previous, highs = -1, 0
        for offset, code in zip(offsets[j : j + kept], codes[j : j + kept]):
            if offset >= length or offset <= previous:
                raise CodecError(f"sparseloco chunk {c} has offset {offset}: out of range [0, {length}) or not "
                                 f"strictly ascending")
            previous = offset
            highs += code >> 1
            level = hi if code & 2 else lo
            out[base + offset] = -level if code & 1 else level
        if highs != high:
            raise CodecError(f"sparseloco chunk {c} marks {highs} values high; its {kept} values have {high}")
        j += kept
    return out


def encode(spec: CodecSpec, values) -> bytes:
    """Encode float32 values (any sequence of floats, array('f') or float32 memoryview) into wire bytes.

    Raises CodecError for an unknown codec, bad params, non-finite values or fp16 overflow.
    """
    return pack(spec, _encode_raw(spec, _f32(values)))


def _encode_raw(spec: CodecSpec, a: array) -> bytes:
    n = len(a)
    if spec.name == "fp32":
        _no_params(spec)
        return _le(a)
    if spec.name == "fp16":
        _no_params(spec)
        try:
            return struct.pack(f"<{n}e", *a)
        except OverflowError:
            raise CodecError(f"a value exceeds half precision's range (|x| <= {FP16_MAX}); use fp32 or int8") from None
    if spec.name == "int8":
        return _int8_encode(a, int8_block(spec))
    if spec.name == "topk":
        indices = _topk_indices(a, topk_count(spec, n))
        return struct.pack("<I", len(indices)) + _le(array("I", indices)) + _le(array("f", (a[i] for i in indices)))
    if spec.name == "sparseloco":
        return _sparseloco_encode(a, sparseloco_layout(spec, n))
    raise CodecError(f"unknown codec {spec.name!r}; known: {', '.join(CODECS)}")


def decode(spec: CodecSpec, data: bytes, n: int) -> array:
    """Decode wire bytes of `n` values into array('f').

    Raises CodecError when the length does not match the codec, or the payload breaks the codec's rules
    (a negative or non-finite int8 scale, an int8 q of -128, a topk count other than k, topk indices out
    of range or not strictly ascending).
    """
    return _decode_raw(spec, unpack(spec, data, n), n)


def apply_delta(model: bytes, spec: CodecSpec, data: bytes) -> bytes:
    """A model's little-endian float32 bytes plus an encoded delta's decoded values, added in float32: the bytes
    server.codecs.apply_delta makes with numpy, bit for bit (a float32 product or sum is exact in a double, or
    rounds to the same float32)."""
    values = _from_le("f", model)
    return _le(array("f", map(operator.add, values, decode(spec, data, len(values)))))


def _decode_raw(spec: CodecSpec, data: bytes, n: int) -> array:
    if spec.name == "fp32":
        return _from_le("f", data)
    if spec.name == "fp16":
        return array("f", struct.unpack(f"<{n}e", data))
    if spec.name == "int8":
        block = int8_block(spec)
        blocks = -(-n // block)
        scales = _from_le("f", data[: 4 * blocks])
        for b, scale in enumerate(scales):
            if not (math.isfinite(scale) and scale >= 0):
                raise CodecError(f"int8 block {b} has scale {scale}; scales are finite and >= 0")
        q = array("b", data[4 * blocks :])
        out = array("f", bytes(4 * n))
        for j, level in enumerate(q):
            if level < -INT8_LEVELS:
                raise CodecError(f"int8 value {j} is {level}; levels run from -127 to 127")
            out[j] = level * scales[j // block]
        return out
    if spec.name == "topk":
        k = topk_count(spec, n)
        (count,) = struct.unpack_from("<I", data)
        if count != k:
            raise CodecError(f"topk payload says {count} values, but k is {k} for n = {n}")
        indices = _from_le("I", data[4 : 4 + 4 * k])
        previous = -1
        for index in indices:
            if index >= n or index <= previous:
                raise CodecError(f"topk index {index} is out of range [0, {n}) or not strictly ascending")
            previous = index
        out = array("f", bytes(4 * n))
        for index, value in zip(indices, _from_le("f", data[4 + 4 * k :])):
            out[index] = value
        return out
    if spec.name == "sparseloco":
        return _sparseloco_decode(data, sparseloco_layout(spec, n))
    raise CodecError(f"unknown codec {spec.name!r}")


class ErrorFeedback:
    """The encoder's memory of what compression lost (Seide et al. 2014; Karimireddy et al. 2019).

    Each round it sends encode(values + residual) and keeps residual = (values + residual) - decoded,
    all in float32, so that nothing a lossy codec drops is lost for good. One per worker and model.
    """

    def __init__(self, n: int):
        _check_n(n)
        self.residual = array("f", bytes(4 * n))

    def encode(self, spec: CodecSpec, values) -> bytes:
        a = _f32(values)
        if len(a) != len(self.residual):
            raise CodecError(f"error feedback holds {len(self.residual)} values, got {len(a)}")
        corrected = array("f", (x + r for x, r in zip(a, self.residual)))
        raw = _encode_raw(spec, _f32(corrected))
        sent = _decode_raw(spec, raw, len(a))
        self.residual = array("f", (x - y for x, y in zip(corrected, sent)))
        return pack(spec, raw)
