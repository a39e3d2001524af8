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


# Named sizes. `tiny` is small enough for a software WebGPU adapter in CI (~137k parameters).
MODEL_SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64),
    "small": GPTConfig(n_layer=4, n_head=8, n_embd=256, block_size=128),
    "base": GPTConfig(n_layer=6, n_head=8, n_embd=384, block_size=256),
}


def model_config(name: str) -> GPTConfig:
    """The configuration of a named size; raises KeyError naming the known sizes."""
    try:
        return MODEL_SIZES[name]
    except KeyError:
        raise KeyError(f"unknown model size {name!r}; known: {', '.join(MODEL_SIZES)}") from None


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
