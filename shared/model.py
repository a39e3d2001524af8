"""The byte-level GPT's configuration and its parameter layout: names, shapes, order and offsets.

One source of truth for the torch model (server/model.py) and the WGSL model (kernels/), so that their flat
float32 parameter vectors line up byte for byte. Never put framework code here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import prod

VOCAB_SIZE = 256  # byte-level: every byte is a token

# The math both implementations follow (server/model.py in torch, kernels/ in WGSL):
#   x = wte[tokens] + wpe[positions]
#   per block: x = x + attn(layer_norm(x, ln_1)); x = x + mlp(layer_norm(x, ln_2))
#   attn: causal multi-head self-attention, scores scaled by 1/sqrt(head_dim), softmax in float32
#   mlp: c_proj(gelu_tanh(c_fc(x))), gelu_tanh(u) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))
#   logits = lm_head(layer_norm(x, ln_f)); loss = mean cross-entropy over every position
# No dropout and no weight tying, so that the browser's gradients can match torch's exactly.
LAYER_NORM_EPS = 1e-5
INIT_STD = 0.02  # normal(0, INIT_STD) for weights; c_proj weights get INIT_STD / sqrt(2 * n_layer)


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of the byte-level GPT. `n_embd` must divide by `n_head`."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # the context length (sequence length) in tokens
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        return cls(**{k: int(d[k]) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")})


# Named sizes. `tiny` is small enough for a software WebGPU adapter in CI (~137k parameters). `gpt2-124m` has GPT-2
# small's shape; its 124M counts GPT-2's 50257-token vocabulary, so with bytes (vocab 256) it has 86.2M.
MODEL_SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64),
    "small": GPTConfig(n_layer=4, n_head=8, n_embd=256, block_size=128),
    "base": GPTConfig(n_layer=6, n_head=8, n_embd=384, block_size=256),
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
}

# The custom form, `n_layer=8,n_head=8,n_embd=512,block_size=256`: every field once, each within its bound.
CUSTOM_MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size")
MAX_CUSTOM_MODEL = {"n_layer": 1024, "n_head": 1024, "n_embd": 65_536, "block_size": 1_048_576}
MAX_PARAMETERS = 2**32 - 1  # WGSL indexes the flat parameter vector with u32
HEAD_DIM_MULTIPLE = 4  # browsers' attention kernels read a head's vectors as vec4s


class ModelSpecError(KeyError, ValueError):
    """A --model that is neither a named size nor a valid custom form; the message says what is wrong.

    A KeyError for callers that look sizes up by name, a ValueError for those that validate input."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else ""


def model_config(name: str) -> GPTConfig:
    """The configuration of a named size (MODEL_SIZES) or of the custom form `n_layer=..,n_head=..,n_embd=..,
    block_size=..`; raises ModelSpecError naming the known sizes, or what is wrong with a custom form."""
    if name in MODEL_SIZES:
        return MODEL_SIZES[name]
    if "=" not in name:
        raise ModelSpecError(f"unknown model size {name!r}; known: {', '.join(MODEL_SIZES)}, or the custom form "
                             "n_layer=8,n_head=8,n_embd=512,block_size=256")
    return _custom_model(name)


def _custom_model(text: str) -> GPTConfig:
    values: dict[str, int] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in CUSTOM_MODEL_FIELDS:
            raise ModelSpecError(f"bad model field {item.strip()!r} in {text!r}: the custom form takes "
                                 f"{', '.join(f + '=N' for f in CUSTOM_MODEL_FIELDS)} (the vocabulary comes from "
                                 "the tokenizer)")
        if key in values:
            raise ModelSpecError(f"model field {key} is given twice in {text!r}")
        if not value.isdigit() or not value.isascii():
            raise ModelSpecError(f"model field {key} must be a positive integer, got {value!r}")
        values[key] = int(value)
        if not 1 <= values[key] <= MAX_CUSTOM_MODEL[key]:
            raise ModelSpecError(f"model field {key}={values[key]} must lie in 1..{MAX_CUSTOM_MODEL[key]}")
    missing = [f for f in CUSTOM_MODEL_FIELDS if f not in values]
    if missing:
        raise ModelSpecError(f"the custom model {text!r} lacks {', '.join(missing)}")
    try:
        cfg = GPTConfig(**values)
    except ValueError as e:
        raise ModelSpecError(f"bad custom model {text!r}: {e}") from None
    if (cfg.n_embd // cfg.n_head) % HEAD_DIM_MULTIPLE:
        raise ModelSpecError(f"bad custom model {text!r}: the head size n_embd/n_head = {cfg.n_embd // cfg.n_head} "
                             f"must be a multiple of {HEAD_DIM_MULTIPLE}, which browsers' kernels need")
    if num_parameters(cfg) > MAX_PARAMETERS:
        raise ModelSpecError(f"the custom model {text!r} has {num_parameters(cfg):,} parameters, more than "
                             f"{MAX_PARAMETERS:,}")
    return cfg


def canonical_model(name: str) -> str:
    """The one spelling of a --model: a named size as given, a custom form as `n_layer=..,n_head=..,n_embd=..,
    block_size=..` (so that spaces or field order cannot make one model look like another job's); ModelSpecError."""
    cfg = model_config(name)
    if name in MODEL_SIZES:
        return name
    return ",".join(f"{f}={getattr(cfg, f)}" for f in CUSTOM_MODEL_FIELDS)


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor: its name, its shape (row-major), and where it sits in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int  # in elements (float32), not bytes

    @property
    def numel(self) -> int:
        return prod(self.shape)


def parameter_layout(cfg: GPTConfig) -> list[ParamSpec]:
    """The parameters in flat-vector order.

    Linear weights are stored (out_features, in_features), as torch.nn.Linear does: y = x @ W.T + b.
    Names match the torch module's `named_parameters()`.
    """
    d, v, t = cfg.n_embd, cfg.vocab_size, cfg.block_size
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (v, d)), ("wpe.weight", (t, d))]
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)),
            (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (3 * d, d)),
            (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)),
            (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)),
            (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (4 * d, d)),
            (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (d, 4 * d)),
            (p + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,)), ("lm_head.weight", (v, d))]
    layout, offset = [], 0
    for name, shape in shapes:
        spec = ParamSpec(name, shape, offset)
        layout.append(spec)
        offset += spec.numel
    return layout


def num_parameters(cfg: GPTConfig) -> int:
    last = parameter_layout(cfg)[-1]
    return last.offset + last.numel


# What a node holds per parameter while it trains, in bytes: the float32 weights, the round's starting point (DiLoCo's
# theta_global, from which the pseudo-gradient is taken), the gradients and AdamW's two moments (4 + 4 + 4 + 8),
# then the update's encoding: the fp32 pseudo-gradient and its int8 codes (4 + 1).
TRAINING_BYTES_PER_PARAMETER = 4 + 4 + 4 + 8 + 4 + 1


@dataclass(frozen=True)
class TrainingMemory:
    """A memory estimate for one node training `cfg` on batches of `batch` sequences, in bytes: the buffers the
    WGSL trainer (kernels/trainer.py) allocates, which a test checks against a real device. It bounds a torch
    trainer too, whose fused attention keeps no T x T probabilities."""

    parameters: int
    model_bytes: int  # the fp32 weights alone: a checkpoint, a download
    state_bytes: int  # TRAINING_BYTES_PER_PARAMETER for each parameter
    activation_bytes: int  # what the forward pass keeps for the backward one, and its scratch, for batch x T rows
    largest_buffer_bytes: int  # the largest single buffer: what a WebGPU device's buffer limits must hold

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def training_memory(cfg: GPTConfig, batch: int) -> TrainingMemory:
    """The estimate for `batch` sequences of T = cfg.block_size tokens (C = n_embd, H = n_head, V = vocab_size).
    Per row (token), in float32: each layer keeps x, ln_1, qkv (3C), attn_y, x_mid, ln_2, fc_pre (4C), fc_act (4C),
    two statistics per layer norm and H x T attention probabilities (16C + 4 + HT); after the layers come x_final,
    ln_f, its statistics, the logits, the row loss (2C + 3 + V) and the backward scratch: d_res, d_ln, d_attn_y,
    d_qkv (3C), d_fc (4C) and d_scores (10C + HT)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    c, h, t, v = cfg.n_embd, cfg.n_head, cfg.block_size, cfg.vocab_size
    p = num_parameters(cfg)
    rows = batch * t
    floats_per_row = cfg.n_layer * (16 * c + 4 + h * t) + (2 * c + 3 + v) + (10 * c + h * t)
    largest = 4 * max(p, rows * h * t, rows * max(4 * c, v))  # a parameter-sized vector, probabilities, fc or logits
    return TrainingMemory(p, 4 * p, TRAINING_BYTES_PER_PARAMETER * p, 4 * rows * floats_per_row, largest)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': sizes as people read them."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
    raise AssertionError("unreachable")
