"""The byte-level GPT in PyTorch, nanoGPT-style, built on the parameter layout of shared/model.py.

Its flat parameter vector (`flat_parameters`) is the one the protocol moves; never reorder parameters here
without changing shared/model.py, which the WGSL model follows too.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.model import INIT_STD, LAYER_NORM_EPS, GPTConfig, parameter_layout


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=LAYER_NORM_EPS)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=LAYER_NORM_EPS)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=LAYER_NORM_EPS)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        names = [name for name, _ in self.named_parameters()]
        expected = [spec.name for spec in parameter_layout(cfg)]
        if names != expected:  # the layout in shared/ is the contract; fail loudly if they drift
            raise RuntimeError(f"torch parameters {names} differ from shared.model layout {expected}")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        if t > self.cfg.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def init_parameters(model: GPT, seed: int) -> None:
    """Deterministic GPT-2-style initialisation from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    proj_std = INIT_STD / math.sqrt(2 * model.cfg.n_layer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            else:
                std = proj_std if name.endswith("c_proj.weight") else INIT_STD
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters as one float32 CPU vector, in shared.model layout order."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def parameter_views(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each parameter's name -> a view into the flat vector (layout order), shaped like it: what
    torch.func.functional_call runs the model on, with nothing copied."""
    total = sum(p.numel() for p in model.parameters())
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} elements, the model has {total}")
    views, offset = {}, 0
    for name, p in model.named_parameters():
        views[name] = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    return views


def load_flat_parameters(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector (layout order) into the model's parameters."""
    total = sum(p.numel() for p in model.parameters())
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} elements, the model has {total}")
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p).to(p.device, p.dtype))
            offset += n
