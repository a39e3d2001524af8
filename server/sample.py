"""`python -m server sample`: a continuation of a prompt by a job's latest model, generated on the CPU with torch, from
a data directory or from a running coordinator (GET /api/export/latest).

The context rule and the token choice are kernels/generate.py's (window_start, choose_token), so that a seed draws
as the browser's generator does from the same logits. Never write anything: sampling only reads its source.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import urllib.error
import urllib.request
from array import array
from pathlib import Path

import torch

from kernels.generate import MAX_TEMPERATURE, GenerationError, choose_token, window_start
from server.export import ExportError, ExportedModel, load_exported, read_safetensors
from server.model import GPT, load_flat_parameters
from shared.model import num_parameters

MAX_SAMPLE_TOKENS = 10_000  # a full forward over the context per token: longer runs belong to a script
MAX_PROMPT_TOKENS = 65_536  # only the last context window is read, but the prompt is held whole
DEFAULT_TOKENS = 200
DEFAULT_TEMPERATURE = 0.8
MAX_EXPORT_BYTES = 16 << 30  # /api/export/latest of the largest model we accept (MAX_PARAMETERS-ish, fp32)
FETCH_TIMEOUT_S = 60.0  # per socket operation while the export downloads
# A forward of fewer float operations than this runs on one thread: waking torch's other threads costs more than
# they save (measured on 2 busy cores: 160 tokens of `tiny` took 26 s on two threads, 0.3 s on one)
ONE_THREAD_MAX_FLOPS = 100_000_000


class SampleError(ValueError):
    """A sample that cannot be made: a bad prompt, option or source; the message says what to change."""


def encode_prompt(model: ExportedModel, prompt: str) -> list[int]:
    """The prompt's token ids in the job's tokenizer; SampleError for text it cannot encode or an empty prompt."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: argv that was not UTF-8, decoded with surrogateescape
        raise SampleError(f"the prompt is not valid UTF-8 text at character {e.start}: give it as UTF-8") from None
    ids = model.tokenizer.encode(prompt)
    if not ids:
        raise SampleError("the prompt is empty: give at least one character for the model to continue")
    if len(ids) > MAX_PROMPT_TOKENS:
        raise SampleError(f"the prompt is {len(ids)} tokens, more than {MAX_PROMPT_TOKENS}: the model reads only the "
                          f"last {model.cfg.block_size} anyway, so shorten it")
    return ids


def choose(logits: torch.Tensor, temperature: float, top_k: int | None, rng: random.Random) -> int:
    """The next token: choose_token over the `top_k` largest logits (ties to the lower id), or over all of them."""
    values = logits.tolist()
    if top_k is None or top_k >= len(values):
        return choose_token(array("f", logits.numpy().tobytes()), temperature, rng)
    kept = sorted(range(len(values)), key=lambda i: (-values[i], i))[:top_k]
    return kept[choose_token(array("f", [values[i] for i in kept]), temperature, rng)]


@torch.no_grad()
def generate(model: GPT, prompt: list[int], count: int, temperature: float = DEFAULT_TEMPERATURE,
             top_k: int | None = None, seed: int | None = None) -> list[int]:
    """`count` token ids after `prompt`: a full forward over the context for each, the context sliding as
    window_start says; temperature 0 is greedy, else tokens are drawn with random.Random(seed)."""
    block = model.cfg.block_size
    tokens, rng, produced = list(prompt), random.Random(seed), []
    start = window_start(0, len(tokens), block)
    model.eval()
    threads = torch.get_num_threads()
    if 2 * num_parameters(model.cfg) * block < ONE_THREAD_MAX_FLOPS:
        torch.set_num_threads(1)
    try:
        for _ in range(count):
            logits = model(torch.tensor([tokens[start:]]))[0][0, -1]
            token = choose(logits, temperature, top_k, rng)
            produced.append(token)
            tokens.append(token)
            start = window_start(start, len(tokens), block)
    finally:
        torch.set_num_threads(threads)
    return produced


def fetch_latest(coordinator: str) -> ExportedModel:
    """The coordinator's current model from its GET /api/export/latest; SampleError when it cannot be had."""
    url = coordinator.rstrip("/") + "/api/export/latest"
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
            size = int(response.headers.get("Content-Length") or 0)
            if not 0 < size <= MAX_EXPORT_BYTES:
                raise SampleError(f"{url} announces {size} bytes; expected 1..{MAX_EXPORT_BYTES}")
            data = response.read(size)
    except urllib.error.HTTPError as e:
        raise SampleError(f"{url} answered {e.code} {e.reason}: is it a swarmgrad coordinator of this version?") \
            from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SampleError(f"cannot read {url}: {getattr(e, 'reason', e)}") from None
    if len(data) != size:
        raise SampleError(f"{url} ended after {len(data)} of {size} bytes")
    return read_safetensors(data)


def check_options(count: int, temperature: float) -> None:
    """SampleError for a token count or temperature out of range: checked before any model is read."""
    if not 1 <= count <= MAX_SAMPLE_TOKENS:
        raise SampleError(f"--tokens must be in 1..{MAX_SAMPLE_TOKENS}, got {count}")
    if not (math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        raise SampleError(f"--temperature must be in 0..{MAX_TEMPERATURE} (0 = always the likeliest token), "
                          f"got {temperature}")


def sample(model: ExportedModel, prompt: str, count: int, temperature: float, top_k: int | None,
           seed: int | None) -> str:
    """The prompt followed by `count` generated tokens, as text."""
    check_options(count, temperature)
    if top_k is not None and not 1 <= top_k <= model.cfg.vocab_size:
        raise SampleError(f"--top-k must be in 1..{model.cfg.vocab_size} (the vocabulary), got {top_k}")
    ids = encode_prompt(model, prompt)
    gpt = GPT(model.cfg)
    load_flat_parameters(gpt, torch.from_numpy(model.params))
    try:
        new = generate(gpt, ids, count, temperature, top_k, seed)
    except GenerationError as e:  # logits that are not finite: a diverged model
        raise SampleError(f"round {model.round}'s model cannot be sampled: {e}") from None
    return model.tokenizer.decode(ids + new)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server sample", description=(
        "Print a prompt's continuation by a job's latest model, generated on this machine's CPU."))
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", type=Path, help="the coordinator's data directory: its latest checkpoint")
    source.add_argument("--coordinator", metavar="URL",
                        help="a running coordinator, e.g. http://127.0.0.1:8000: its current model")
    p.add_argument("--store", default=None, metavar="URL",
                   help="with --data-dir: the PostgreSQL database its coordinator ran with (--store), if it did")
    p.add_argument("--prompt", required=True, help="the text to continue (in the job's tokenizer)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                   help=f"tokens to generate, 1..{MAX_SAMPLE_TOKENS} (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, metavar="T",
                   help="softmax temperature; 0 always takes the likeliest token (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="draw only from the K likeliest tokens (default: from all)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of the draws: the same seed, model and options print the same text (default: fresh)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        check_options(args.tokens, args.temperature)
        if args.store and not args.data_dir:
            raise SampleError("--store goes with --data-dir (a coordinator URL serves its own model)")
        model = load_exported(args.data_dir, None, args.store) if args.data_dir else fetch_latest(args.coordinator)
        text = sample(model, args.prompt, args.tokens, args.temperature, args.top_k, args.seed)
    except (SampleError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[round {model.round} of model {model.model}, hash {model.model_hash[:12]}]", file=sys.stderr)
    print(text)
    return 0
