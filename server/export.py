"""Exports a job's model: a Hugging Face directory (transformers' GPT-2 classes load it, with its tokenizer), or a flat
safetensors file with our parameter names, which GET /api/export/latest also serves from a running coordinator.

Never import transformers at module level (a heavy import that only the hf format needs), and never write into a
data directory: exporting only reads it, perhaps while its coordinator runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from server.coordinator.checkpoint import CheckpointError, model_hash, read_checkpoint
from server.coordinator.store import StoreUnavailable, open_store
from server.tokenizer import BpeTokenizer, ByteTokenizer, JobTokenizer, TokenizerError, job_tokenizer, parse_tokenizer
from shared.model import LAYER_NORM_EPS, GPTConfig, ModelSpecError, model_config, num_parameters, parameter_layout

if TYPE_CHECKING:
    from server.coordinator.coordinator import Coordinator

FORMATS = ("hf", "safetensors")
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own bound on its JSON header
SAFETENSORS_ALIGNMENT = 8  # the header is padded with spaces so that the tensor data starts 8-byte aligned
STREAM_CHUNK_BYTES = 1 << 20  # /api/export/latest sends the parameters in slices of this size, never copied whole
METADATA_PREFIX = "swarmgrad."
# GPT-2 stores these weights in Conv1D modules, (in_features, out_features): the transpose of our nn.Linear's
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class ExportError(Exception):
    """What was asked cannot be exported: no job, no such round, a pruned or damaged checkpoint, a bad file."""


@dataclass(frozen=True)
class ExportedModel:
    """One committed model of a job: its flat float32 parameters (shared.model layout) and what describes them."""

    model: str  # the job's --model (a named size or the custom form)
    cfg: GPTConfig
    round: int
    model_hash: str
    params: np.ndarray
    tokenizer: JobTokenizer

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata (strings only, as the format requires) that lets a reader rebuild this, the
        tokenizer included (a BPE's whole tokenizer file: a few MB at most, within the format's header bound)."""
        meta = {"format": "pt", METADATA_PREFIX + "model": self.model,
                METADATA_PREFIX + "config": json.dumps(self.cfg.to_dict(), sort_keys=True),
                METADATA_PREFIX + "round": str(self.round), METADATA_PREFIX + "model_hash": self.model_hash,
                METADATA_PREFIX + "tokenizer": str(self.tokenizer.spec)}
        if self.tokenizer.json is not None:
            meta[METADATA_PREFIX + "tokenizer_json"] = self.tokenizer.json
        return meta


def tokenizer_from_metadata(meta: Mapping[str, str]) -> JobTokenizer:
    """The tokenizer an export's metadata carries: its spec, and for BPE its tokenizer file. TokenizerError."""
    spec = parse_tokenizer(meta.get(METADATA_PREFIX + "tokenizer", "bytes"))
    if spec.kind == "bytes":
        return ByteTokenizer()
    if METADATA_PREFIX + "tokenizer_json" not in meta:
        raise TokenizerError(f"the export names tokenizer {spec} but does not carry its file")
    return BpeTokenizer(meta[METADATA_PREFIX + "tokenizer_json"], spec)


# -- reading a job ----------------------------------------------------------------------------------------------


def load_exported(data_dir: Path, round_: int | None = None, store_url: str | None = None) -> ExportedModel:
    """The model of committed round `round_` (None: the latest) of the job in `data_dir` (its state in
    `store_url` when the coordinator ran with --store), checked against the hash the store recorded. ExportError
    says what is missing."""
    try:
        store = open_store(store_url or data_dir / "state.db", read_only=True)
    except FileNotFoundError:
        raise ExportError(f"no swarmgrad job in {data_dir} (no state.db): start one with "
                          f"`python -m server --data-dir {data_dir}`, or name another --data-dir (and --store, "
                          "if its coordinator kept its state in PostgreSQL)") from None
    except StoreUnavailable as e:
        raise ExportError(f"cannot read the store: {e}") from None
    try:
        job = store.get_meta("job")
        rounds = store.rounds()
    finally:
        store.close()
    if not isinstance(job, dict) or not rounds:
        raise ExportError(f"{data_dir} holds no committed model yet: its coordinator has not finished starting")
    if round_ is None:
        record = rounds[-1]
    else:
        record = next((r for r in rounds if r.round == round_), None)
        if record is None:
            raise ExportError(f"round {round_} is not committed in {data_dir}: rounds 0..{rounds[-1].round} are")
    path = data_dir / "checkpoints" / record.checkpoint
    if not path.exists():
        kept = sorted(int(p.stem.split("-")[1]) for p in path.parent.glob("round-*.ckpt"))
        raise ExportError(f"the checkpoint of round {record.round} is no longer kept in {path.parent} "
                          f"(kept: rounds {', '.join(map(str, kept)) or 'none'})")
    try:
        ckpt = read_checkpoint(path, record.checkpoint_sha256)
        spec = parse_tokenizer(str(job.get("tokenizer") or "bytes"))  # jobs before --tokenizer name none: bytes
        cfg = replace(model_config(str(job["model"])), vocab_size=spec.vocab_size)
        tokenizer = job_tokenizer(data_dir, cfg.vocab_size)
    except (CheckpointError, ModelSpecError, TokenizerError) as e:
        raise ExportError(f"cannot export round {record.round} of {data_dir}: {e}") from None
    if ckpt.params.size != num_parameters(cfg):
        raise ExportError(f"{path} holds {ckpt.params.size} parameters, but model {job['model']!r} has "
                          f"{num_parameters(cfg)}")
    return ExportedModel(str(job["model"]), cfg, record.round, record.model_hash, ckpt.params, tokenizer)


# -- safetensors: the flat state dict with our names ------------------------------------------------------------


def safetensors_header(cfg: GPTConfig, metadata: Mapping[str, str]) -> bytes:
    """The safetensors header (length prefix and JSON) of the flat vector's parameters in layout order: followed
    by the flat vector's little-endian float32 bytes, it is the whole file, so nothing is copied to make one."""
    entries: dict[str, object] = {"__metadata__": dict(metadata)}
    for spec in parameter_layout(cfg):
        entries[spec.name] = {"dtype": "F32", "shape": list(spec.shape),
                              "data_offsets": [4 * spec.offset, 4 * (spec.offset + spec.numel)]}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % SAFETENSORS_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(model: ExportedModel, out: Path) -> None:
    """`out` as one safetensors file: our parameter names and shapes, float32, with the model's metadata."""
    with _fresh_path(out) as tmp:
        with open(tmp, "wb") as f:
            f.write(safetensors_header(model.cfg, model.metadata()))
            f.write(np.ascontiguousarray(model.params, "<f4").tobytes())


def read_safetensors(data: bytes) -> ExportedModel:
    """A flat safetensors export (ours, or the same names written by any safetensors writer) back as a model: the
    tensors are placed by name into the layout of the config its metadata names. ExportError when malformed."""
    if len(data) < 8:
        raise ExportError("not a safetensors file: shorter than its 8-byte header length")
    (size,) = struct.unpack_from("<Q", data)
    if size > MAX_SAFETENSORS_HEADER or 8 + size > len(data):
        raise ExportError(f"not a safetensors file: a header of {size} bytes in {len(data)}")
    try:
        header = json.loads(data[8 : 8 + size])
        meta = header.pop("__metadata__", {})
        cfg = GPTConfig.from_dict(json.loads(meta[METADATA_PREFIX + "config"]))
        model, round_ = meta[METADATA_PREFIX + "model"], int(meta[METADATA_PREFIX + "round"])
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"not a swarmgrad safetensors export (its metadata lacks the model config): {e}") from None
    body = memoryview(data)[8 + size :]
    layout = parameter_layout(cfg)
    if set(header) != {spec.name for spec in layout}:
        raise ExportError(f"the tensors {sorted(set(header) ^ {s.name for s in layout})[:5]} do not match the layout "
                          f"of {model!r}")
    params = np.empty(num_parameters(cfg), np.float32)
    for spec in layout:
        try:
            entry = header[spec.name]
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"tensor {spec.name}'s header entry is malformed: {header[spec.name]!r:.200}") from None
        if dtype != "F32" or shape != spec.shape or not 0 <= begin <= end <= len(body) or end - begin != 4 * spec.numel:
            raise ExportError(f"tensor {spec.name} is {dtype} {list(shape)} at {begin}..{end}; "
                              f"expected F32 {list(spec.shape)} within {len(body)} bytes")
        params[spec.offset : spec.offset + spec.numel] = np.frombuffer(body[begin:end], "<f4")
    hash_ = model_hash(params)
    if meta.get(METADATA_PREFIX + "model_hash", hash_) != hash_:
        raise ExportError("the parameters do not match the model hash in the file's metadata")
    try:
        tokenizer = tokenizer_from_metadata(meta)
    except TokenizerError as e:
        raise ExportError(f"the export's tokenizer cannot be used: {e}") from None
    return ExportedModel(model, cfg, round_, hash_, params, tokenizer)


def latest_export_endpoint(coordinator: Coordinator):
    """GET /api/export/latest: the coordinator's current model as a flat safetensors file (our names, the config
    and round in its metadata), streamed from the bytes it already holds."""
    from starlette.requests import Request
    from starlette.responses import StreamingResponse

    tokenizer = job_tokenizer(coordinator.data_dir, coordinator.cfg.vocab_size)  # fixed for the job's life

    async def endpoint(request: Request) -> StreamingResponse:
        held = coordinator.model  # one model's round, hash and bytes, taken together before anything awaits
        exported = ExportedModel(coordinator.job.model, coordinator.cfg, held.round, held.hash, held.params,
                                 tokenizer)
        header, body = safetensors_header(exported.cfg, exported.metadata()), memoryview(held.bytes)

        def chunks() -> Iterator[bytes | memoryview]:
            yield header
            for start in range(0, len(body), STREAM_CHUNK_BYTES):
                yield body[start : start + STREAM_CHUNK_BYTES]

        name = f"swarmgrad-round-{held.round}.safetensors"
        return StreamingResponse(chunks(), media_type="application/octet-stream", headers={
            "Content-Length": str(len(header) + len(body)), "Content-Disposition": f'attachment; filename="{name}"',
            "X-Swarmgrad-Round": str(held.round), "X-Swarmgrad-Model-Hash": held.hash, "Cache-Control": "no-store"})

    return endpoint


# -- Hugging Face: GPT2LMHeadModel and a tokenizer --------------------------------------------------------------


def hf_state_dict(cfg: GPTConfig, params: np.ndarray) -> dict:
    """Our parameters under GPT2LMHeadModel's names, as torch tensors: the transformer's under `transformer.`, the
    Conv1D weights transposed, and lm_head.weight kept apart from wte (we tie nothing)."""
    import torch

    flat = torch.from_numpy(np.ascontiguousarray(params, np.float32))
    state = {}
    for spec in parameter_layout(cfg):
        tensor = flat[spec.offset : spec.offset + spec.numel].view(spec.shape)
        if spec.name.endswith(HF_TRANSPOSED):
            tensor = tensor.t()
        name = spec.name if spec.name == "lm_head.weight" else "transformer." + spec.name
        state[name] = tensor.contiguous()
    return state


def hf_config(model: ExportedModel):
    """The GPT2Config of exactly our model: pre-LN blocks, tanh-approximated GELU ("gelu_new"), LayerNorm eps, a
    4x MLP, learned positions, no dropout, untied embeddings, and no special tokens (all 256 byte ids are bytes)."""
    from transformers import GPT2Config

    cfg = model.cfg
    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_inner=4 * cfg.n_embd, activation_function="gelu_new",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=LAYER_NORM_EPS,
                      scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                      architectures=["GPT2LMHeadModel"],
                      swarmgrad={"model": model.model, "round": model.round, "model_hash": model.model_hash,
                                 "tokenizer": str(model.tokenizer.spec)})


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (what the `tokenizers` ByteLevel pre-tokenizer and decoder use):
    printable Latin-1 bytes stand for themselves, the rest for the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def hf_tokenizer(model: ExportedModel):
    """The job's tokenizer as a transformers fast tokenizer: a BPE job's own tokenizer file; for bytes, a byte-level
    BPE without merges whose ids are the byte values, so that any UTF-8 text encodes to exactly its bytes and
    decodes back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if model.tokenizer.json is not None:
        tokenizer = Tokenizer.from_str(model.tokenizer.json)
    else:
        vocab = {char: byte for byte, char in byte_to_unicode().items()}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model.cfg.block_size)


def write_hf(model: ExportedModel, out: Path) -> None:
    """`out` as a directory that transformers' AutoModelForCausalLM and AutoTokenizer load (config.json,
    model.safetensors, the tokenizer's files). Raises ExportError when transformers is missing."""
    try:
        import torch
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as transformers_logging
    except ImportError as e:
        raise ExportError(f"the hf format needs transformers (pip install -e '.[dev]'): {e}") from None
    transformers_logging.disable_progress_bar()  # a progress bar per file says nothing in a one-line command
    with torch.device("meta"):  # no random initialisation: every weight is assigned below
        hf = GPT2LMHeadModel(hf_config(model))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model.cfg, model.params), strict=False, assign=True)
    if missing or unexpected:  # a transformers version whose GPT-2 no longer matches our mapping: never half-export
        raise ExportError(f"transformers' GPT-2 does not match our parameters (missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]})")
    with _fresh_path(out) as tmp:
        hf.save_pretrained(tmp)
        hf_tokenizer(model).save_pretrained(tmp)


class _fresh_path:
    """A temporary sibling of `out` that becomes `out` (by rename) only when the block completes; `out` must not
    exist yet, so an export never overwrites a file or a directory."""

    def __init__(self, out: Path):
        if out.exists():
            raise ExportError(f"{out} already exists: remove it or name another output")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)) / out.name

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                os.replace(self.tmp, self.out)
        finally:
            shutil.rmtree(self.tmp.parent, ignore_errors=True)


# -- command line -----------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server export", description=(
        "Export a job's model from its data directory: --format hf writes a directory that transformers' "
        "AutoModelForCausalLM and AutoTokenizer load (GPT-2 classes, untied embeddings); --format safetensors "
        "writes one file with our parameter names. A running coordinator serves the latter at /api/export/latest."))
    p.add_argument("--data-dir", type=Path, default=Path("swarmgrad-data"),
                   help="the coordinator's data directory (default: %(default)s)")
    p.add_argument("--store", default=None, metavar="URL",
                   help="the PostgreSQL database its coordinator ran with (--store), if it did (default: "
                        "DATA_DIR/state.db)")
    p.add_argument("--round", type=int, default=None, metavar="N",
                   help="a committed round whose checkpoint is still kept (default: the latest)")
    p.add_argument("--format", required=True, choices=FORMATS, help="hf (a directory) or safetensors (a file)")
    p.add_argument("out", type=Path, metavar="OUT", help="where to write; must not exist yet")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        model = load_exported(args.data_dir, args.round, args.store)
        (write_hf if args.format == "hf" else write_safetensors)(model, args.out)
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.format}): round {model.round} of model {model.model} "
          f"({model.params.size:,} parameters), model hash {model.model_hash}")
    return 0
