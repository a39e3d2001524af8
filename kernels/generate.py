"""Generates text with the GPT on a Device: a forward pass per token, keys and values cached on the GPU.

Never write to a trainer's buffers nor share its queue: a generator owns its parameters and activations, so a page
can give it a device of its own and generation never disturbs training. Never import a GPU binding here.

    generator = DeviceGenerator(device, cfg, params)                # params: flat float32, shared.model layout
    async for token in generator.generate(b"Once upon", 40, temperature=0.0):   # 0: greedy
        ...
"""

from __future__ import annotations

import math
import random
import struct
from array import array
from typing import Any, AsyncIterator

from kernels.device import Device, Dispatch
from kernels.shaders import KernelCache
from kernels.trainer import LAYER_NORM_EPS_BITS, MATMUL_WORKGROUP, _float_bytes, ceil_div
from shared.model import GPTConfig, num_parameters, parameter_layout
from shared.tokens import token_width

MAX_NEW_TOKENS = 1024  # tokens one generate() call may produce
MAX_PROMPT_TOKENS = 4096  # only the last context window of it is read, but it is all held as a list
MAX_TEMPERATURE = 10.0  # above this, sampling is indistinguishable from uniform noise: refuse it as a likely typo
DECODE_WORKGROUP = 64  # attention_decode.wgsl's workgroup size: one invocation per head


class GenerationError(ValueError):
    """A generation request that cannot be served: bad prompt, length or temperature, or a model gone non-finite."""


class ContextFull(GenerationError):
    """feed() past block_size tokens: reset(), or let generate() slide the context window."""


def window_start(start: int, length: int, block_size: int) -> int:
    """Where the context begins when predicting token `length` of a sequence whose context began at `start`.

    While tokens[start:length] fits in block_size it stays; past it, the context restarts with the last half
    window (block_size - block_size // 2 tokens), so that the key/value cache is rebuilt once per half window
    rather than once per token. The torch loop of `python -m server sample` (server/sample.py) follows it too.
    """
    if length - start <= block_size:
        return start
    return length - (block_size - block_size // 2)


def choose_token(logits: array, temperature: float, rng: random.Random) -> int:
    """The next token: the first largest logit at temperature 0 (as torch.argmax), else a sample of
    softmax(logits / temperature) drawn with `rng`."""
    if not all(map(math.isfinite, logits)):
        raise GenerationError("the model's logits are not finite: the parameters have diverged")
    best = max(range(len(logits)), key=logits.__getitem__)  # max keeps the first of equal keys
    if temperature <= 0:
        return best
    top = logits[best]
    weights = [math.exp((value - top) / temperature) for value in logits]
    return rng.choices(range(len(logits)), weights=weights)[0]


class DeviceGenerator:
    """One GPT for inference on a Device: its parameters, one token's activations, and a key/value cache per layer.

    `position` is how many tokens the cache holds; `feed` appends one (submitting its forward pass without
    waiting) and `read_logits` waits for the distribution over the token after the last one fed.
    """

    def __init__(self, device: Device, cfg: GPTConfig, params, kernels: KernelCache | None = None):
        if (cfg.n_embd // cfg.n_head) % 4:
            raise ValueError(f"the WGSL kernels read vec4s: head_dim (n_embd / n_head) must divide by 4, got {cfg}")
        if cfg.vocab_size % 4:
            raise ValueError(f"the WGSL matmuls read the vocabulary axis as vec4s: vocab_size must divide by 4, got "
                             f"{cfg.vocab_size}")
        self.token_bits = 8 * token_width(cfg.vocab_size)  # embedding.wgsl's packing; the id sits in the low bits
        self.device = device
        self.cfg = cfg
        self.num_params = num_parameters(cfg)
        self.layout = {spec.name: spec for spec in parameter_layout(cfg)}
        self.kernels = kernels or KernelCache(device)
        self.position = 0
        c = cfg.n_embd

        def floats(count: int, label: str) -> Any:
            return device.create_buffer(4 * count, label)

        self.params = floats(self.num_params, "generator params")
        self.token = floats(1, "token")  # one id, in the low bits of a u32 (token 0 of embedding.wgsl's packing)
        self.x = floats(c, "x")  # the residual stream: block input, and output of its MLP
        self.x_mid = floats(c, "x after attention")
        self.normed = floats(c, "layer-norm output")
        self.norm_stats = floats(2, "layer-norm mean, rstd")
        self.qkv = floats(3 * c, "qkv")
        self.attn_y = floats(c, "attention output")
        self.fc_pre = floats(4 * c, "fc")
        self.fc_act = floats(4 * c, "gelu(fc)")
        self.logits = floats(cfg.vocab_size, "logits")
        self.scores = floats(cfg.n_head * cfg.block_size, "attention scores")
        self.no_residual = floats(4, "no residual")
        self.caches = [floats(cfg.block_size * 2 * c, f"h{i} key/value cache") for i in range(cfg.n_layer)]
        self.embed_dims = floats(8, "embed dims")  # rewritten each token: the position picks the wpe row
        self.decode_dims = floats(8, "attention decode dims")  # rewritten each token
        self.load_params(params)
        self._plan = self._build_plan()

    # ---- public API -------------------------------------------------------------------------------------

    def load_params(self, params) -> None:
        """Upload a flat float32 parameter vector and empty the cache."""
        self.device.write_buffer(self.params, _float_bytes(params, self.num_params, "params"))
        self.reset()

    def reset(self) -> None:
        """Forget the context: the next token fed is at position 0 (stale cache rows are never read)."""
        self.position = 0

    def feed(self, token: int) -> None:
        """Append `token` at `position` and submit its forward pass; returns without waiting."""
        cfg = self.cfg
        if not 0 <= token < cfg.vocab_size:
            raise GenerationError(f"token {token} is outside the vocabulary 0..{cfg.vocab_size - 1}")
        if self.position >= cfg.block_size:
            raise ContextFull(f"the context holds block_size={cfg.block_size} tokens already; reset() first")
        c, p = cfg.n_embd, self.position
        wpe_row = self.layout["wpe.weight"].offset + p * c  # embed_forward with seq=1 reads wpe at row 0 of this
        self.device.write_buffer(self.token, struct.pack("<I", token))
        self.device.write_buffer(self.embed_dims, array("I", [1, 1, c, cfg.vocab_size, cfg.block_size,
                                                              self.layout["wte.weight"].offset, wpe_row,
                                                              self.token_bits]))
        self.device.write_buffer(self.decode_dims, array("I", [p, cfg.n_head, c // cfg.n_head, c, cfg.block_size,
                                                               0, 0, 0]))
        self.device.submit(self._plan)
        self.position += 1

    async def read_logits(self) -> array:
        """The logits (float32) of the token after the last one fed."""
        if self.position == 0:
            raise GenerationError("no token fed yet: there is nothing to predict from")
        return array("f", await self.device.read_buffer(self.logits, 4 * self.cfg.vocab_size))

    async def prefill(self, tokens) -> array:
        """Reset, feed every token of `tokens` (one readback in all), and return the logits after the last."""
        if not tokens:
            raise GenerationError("the prompt is empty: give at least one token")
        if len(tokens) > self.cfg.block_size:
            raise ContextFull(f"{len(tokens)} tokens do not fit the context of {self.cfg.block_size}")
        self.reset()
        for token in tokens:
            self.feed(token)
        return await self.read_logits()

    async def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0,
                       seed: int | None = None) -> AsyncIterator[int]:
        """Yield up to `max_new_tokens` token ids after `prompt` (bytes, for a byte vocabulary, or a list of ids).

        temperature 0 is greedy; above 0, tokens are drawn from softmax(logits / temperature) with a
        random.Random(seed). Past block_size, the context slides as `window_start` says.
        """
        tokens = list(prompt)
        if not tokens:
            raise GenerationError("the prompt is empty: give at least one token")
        if len(tokens) > MAX_PROMPT_TOKENS:
            raise GenerationError(f"a prompt of {len(tokens)} tokens exceeds MAX_PROMPT_TOKENS={MAX_PROMPT_TOKENS}")
        if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise GenerationError(f"max_new_tokens must be in 0..{MAX_NEW_TOKENS}, got {max_new_tokens}")
        if not 0 <= temperature <= MAX_TEMPERATURE:  # also refuses NaN
            raise GenerationError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {temperature}")
        rng = random.Random(seed)
        block = self.cfg.block_size
        start = window_start(0, len(tokens), block)
        logits = await self.prefill(tokens[start:]) if max_new_tokens else None
        for produced in range(1, max_new_tokens + 1):
            token = choose_token(logits, temperature, rng)
            yield token
            if produced == max_new_tokens:
                return
            tokens.append(token)
            moved = window_start(start, len(tokens), block)
            if moved != start:
                start = moved
                logits = await self.prefill(tokens[start:])
            else:
                self.feed(token)
                logits = await self.read_logits()

    # ---- plan building ----------------------------------------------------------------------------------

    def _dims(self, fields: list[int], label: str) -> Any:
        buffer = self.device.create_buffer(4 * len(fields), label)
        self.device.write_buffer(buffer, array("I", fields))
        return buffer

    def _dispatch(self, file_name: str, entry: str, buffers: dict[int, Any], workgroups) -> Dispatch:
        kernel = self.kernels.get(file_name, entry)
        return Dispatch(kernel, self.device.create_binding(kernel, buffers), tuple(workgroups))

    def _linear(self, x, name: str, out, cols: int, inner: int, residual=None, bias: bool = True) -> Dispatch:
        """y = x @ W.T (+ b) (+ residual) for one row, through matmul.wgsl's linear_forward (offsets in vec4s)."""
        spec = self.layout
        flags = (1 if bias else 0) | (2 if residual is not None else 0)
        bias_at = spec[name + ".bias"].offset // 4 if bias else 0
        dims = self._dims([1, cols, inner, 0, spec[name + ".weight"].offset // 4, bias_at, 0, flags], f"{name} dims")
        grid = (ceil_div(cols // 4, MATMUL_WORKGROUP), 1, 1)
        buffers = {0: x, 1: self.params, 2: residual or self.no_residual, 3: out, 4: dims}
        return self._dispatch("matmul.wgsl", "linear_forward", buffers, grid)

    def _layer_norm(self, x, name: str) -> Dispatch:
        dims = self._dims([1, self.cfg.n_embd, self.layout[name + ".weight"].offset,
                           self.layout[name + ".bias"].offset, LAYER_NORM_EPS_BITS, 0, 0, 0], f"{name} dims")
        return self._dispatch("layer_norm.wgsl", "layer_norm_forward",
                              {0: x, 1: self.params, 2: self.normed, 3: self.norm_stats, 6: dims}, (1, 1, 1))

    def _build_plan(self) -> list[Dispatch]:
        """One token's forward pass; what changes per token lives in the token, embed and decode dims buffers."""
        cfg = self.cfg
        c, v = cfg.n_embd, cfg.vocab_size
        gelu_dims = self._dims([4 * c, 0, 0, 0], "gelu dims")
        steps = [self._dispatch("embedding.wgsl", "embed_forward",
                                {0: self.token, 1: self.params, 2: self.x, 4: self.embed_dims},
                                (ceil_div(c, 256), 1, 1))]
        for i, cache in enumerate(self.caches):
            h = f"h.{i}."
            steps += [
                self._layer_norm(self.x, h + "ln_1"),
                self._linear(self.normed, h + "attn.c_attn", self.qkv, 3 * c, c),
                self._dispatch("attention_decode.wgsl", "attention_decode",
                               {0: self.qkv, 1: cache, 2: self.scores, 3: self.attn_y, 4: self.decode_dims},
                               (ceil_div(cfg.n_head, DECODE_WORKGROUP), 1, 1)),
                self._linear(self.attn_y, h + "attn.c_proj", self.x_mid, c, c, residual=self.x),
                self._layer_norm(self.x_mid, h + "ln_2"),
                self._linear(self.normed, h + "mlp.c_fc", self.fc_pre, 4 * c, c),
                self._dispatch("gelu.wgsl", "gelu_forward", {0: self.fc_pre, 1: self.fc_act, 2: gelu_dims},
                               (ceil_div(4 * c, 256), 1, 1)),
                self._linear(self.fc_act, h + "mlp.c_proj", self.x, c, 4 * c, residual=self.x_mid),
            ]
        steps.append(self._layer_norm(self.x, "ln_f"))
        steps.append(self._linear(self.normed, "lm_head", self.logits, v, c, bias=False))
        return steps
