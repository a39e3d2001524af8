"""Trains the GPT on a Device: forward, backward and AdamW in WGSL, every tensor kept on the GPU.

Never read a buffer back inside the training loop (only the losses once at the end, or when asked), and never
import a GPU binding: the Device passed in is the only way to the GPU.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import Any, Iterable

from kernels.device import MAX_WORKGROUPS_PER_DIMENSION, Device, Dispatch, grid_for
from kernels.int8_codec import DeviceInt8Codec
from kernels.shaders import KernelCache
from shared.model import LAYER_NORM_EPS, GPTConfig, num_parameters, parameter_layout
from shared.tokens import token_width

# Losses of this many steps stay on the device before train_steps reads them back.
LOSS_SLOTS = 1024
MATMUL_WORKGROUP = 8  # 8x8 invocations, each 4x4 outputs: a 32x32 output tile per workgroup
LAYER_NORM_EPS_BITS = struct.unpack("<I", struct.pack("<f", LAYER_NORM_EPS))[0]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _float_bytes(values, count: int, what: str) -> memoryview:
    """`values` (bytes, array('f'), float32 memoryview) as raw bytes, checked to hold `count` float32."""
    if isinstance(values, array) and values.typecode != "f":
        raise TypeError(f"{what} must be float32, got array('{values.typecode}')")
    data = memoryview(values).cast("B")
    if len(data) != 4 * count:
        raise ValueError(f"{what} must hold {count} float32 ({4 * count} bytes), got {len(data)} bytes")
    return data


def _token_data(tokens, width: int) -> bytes:
    """Token ids packed `width` bytes each, little-endian (shared/tokens.py), as the kernels read them. Bytes-like
    input is taken as already packed (what browser_node.batches_at makes of a shard); an array or a list of ints is
    packed here. Raises ValueError for an id that does not fit `width` bytes."""
    if isinstance(tokens, (bytes, bytearray, memoryview)):
        return bytes(tokens)
    if isinstance(tokens, array) and tokens.itemsize == width and tokens.typecode in "BH":
        packed = tokens
    else:
        try:
            packed = array("B" if width == 1 else "H", tokens)
        except OverflowError:
            raise ValueError(f"a token id does not fit in {width} byte(s)") from None
    if width > 1 and sys.byteorder == "big":
        packed = array(packed.typecode, packed)
        packed.byteswap()
    return packed.tobytes()


@dataclass(frozen=True)
class _Activations:
    """Device buffers of one transformer block that the backward pass reads."""

    x: Any  # block input (rows, C)
    ln_1: Any
    ln_1_stats: Any
    qkv: Any
    probs: Any
    attn_y: Any
    x_mid: Any  # after the attention residual
    ln_2: Any
    ln_2_stats: Any
    fc_pre: Any
    fc_act: Any


class DeviceTrainer:
    """One GPT replica on a Device: parameters, gradients, AdamW moments and activations live in GPU buffers.

    `params` is the flat float32 vector of shared.model.parameter_layout; it is also kept as the round's
    starting point (theta_global), so that `pseudo_gradient_int8` can quantise theta_global - theta_local.
    `max_batch_size` bounds B in every batch (activations are allocated for B x block_size).
    """

    def __init__(self, device: Device, cfg: GPTConfig, params, max_batch_size: int = 8):
        if (cfg.n_embd // cfg.n_head) % 4:
            raise ValueError(f"the WGSL kernels read vec4s: head_dim (n_embd / n_head) must divide by 4, got {cfg}")
        if cfg.vocab_size % 4:
            raise ValueError(f"the WGSL matmuls read the vocabulary axis as vec4s: vocab_size must divide by 4, got "
                             f"{cfg.vocab_size}")
        self.token_width = token_width(cfg.vocab_size)  # bytes per token id in the token and target buffers
        self.device = device
        self.cfg = cfg
        self.max_batch_size = max_batch_size
        self.num_params = num_parameters(cfg)
        self.layout = {spec.name: spec for spec in parameter_layout(cfg)}
        self.kernels = KernelCache(device)
        self.step = 0  # AdamW's step count t, for bias correction

        p_bytes = 4 * self.num_params
        self.params = device.create_buffer(p_bytes, "params")
        self.global_params = device.create_buffer(p_bytes, "global params")
        self.grads = device.create_buffer(p_bytes, "grads")
        self.exp_avg = device.create_buffer(p_bytes, "adam exp_avg")
        self.exp_avg_sq = device.create_buffer(p_bytes, "adam exp_avg_sq")
        self.load_params(params)

        c, rows = cfg.n_embd, max_batch_size * cfg.block_size
        probs = 4 * max_batch_size * cfg.n_head * cfg.block_size * cfg.block_size

        def activation(floats_per_row: int, label: str) -> Any:
            return device.create_buffer(4 * rows * floats_per_row, label)

        self.blocks = [
            _Activations(
                x=activation(c, f"h{i}.x"),
                ln_1=activation(c, f"h{i}.ln_1"),
                ln_1_stats=activation(2, f"h{i}.ln_1 stats"),
                qkv=activation(3 * c, f"h{i}.qkv"),
                probs=device.create_buffer(probs, f"h{i}.probs"),
                attn_y=activation(c, f"h{i}.attn_y"),
                x_mid=activation(c, f"h{i}.x_mid"),
                ln_2=activation(c, f"h{i}.ln_2"),
                ln_2_stats=activation(2, f"h{i}.ln_2 stats"),
                fc_pre=activation(4 * c, f"h{i}.fc_pre"),
                fc_act=activation(4 * c, f"h{i}.fc_act"),
            )
            for i in range(cfg.n_layer)
        ]
        self.x_final = activation(c, "x final")
        self.ln_f = activation(c, "ln_f")
        self.ln_f_stats = activation(2, "ln_f stats")
        self.logits = activation(cfg.vocab_size, "logits, then dlogits")
        self.row_loss = activation(1, "row loss")
        self.losses = device.create_buffer(4 * LOSS_SLOTS, "losses")
        self.loss_slot = device.create_buffer(16, "loss slot")
        self.d_res = activation(c, "d residual")
        self.d_ln = activation(c, "d layer-norm output")
        self.d_attn_y = activation(c, "d attention output")
        self.d_qkv = activation(3 * c, "d qkv")
        self.d_fc = activation(4 * c, "d fc")
        self.d_scores = device.create_buffer(probs, "d scores")
        self.no_residual = device.create_buffer(16, "no residual")
        token_bytes = max(4, ceil_div(rows * self.token_width, 4) * 4)
        self.tokens = device.create_buffer(token_bytes, "tokens")
        self.targets = device.create_buffer(token_bytes, "targets")
        self.adam_hyper = device.create_buffer(32, "adamw hyperparameters")
        self.codec = DeviceInt8Codec(device, self.num_params, self.kernels)
        self._plans: dict[tuple[int, int], list[Dispatch]] = {}
        self._pseudo_gradient: tuple[Any, Dispatch] | None = None  # (output buffer, dispatch), made on first use
        self._adamw = self._dispatch(
            "adamw.wgsl",
            "adamw_step",
            {0: self.params, 1: self.grads, 2: self.exp_avg, 3: self.exp_avg_sq, 4: self.adam_hyper},
            grid_for(ceil_div(self.num_params, 256)),
        )

    # ---- public API -------------------------------------------------------------------------------------

    def load_params(self, params) -> None:
        """Upload a flat float32 parameter vector as both the local and the round's global parameters."""
        data = _float_bytes(params, self.num_params, "params")
        self.device.write_buffer(self.params, data)
        self.device.write_buffer(self.global_params, data)

    def reset_optimizer(self) -> None:
        """Zero AdamW's moments and its step count."""
        zeros = bytes(4 * self.num_params)
        self.device.write_buffer(self.exp_avg, zeros)
        self.device.write_buffer(self.exp_avg_sq, zeros)
        self.step = 0

    async def loss_and_grads(self, tokens, targets, seq_len: int | None = None) -> tuple[float, array]:
        """Mean cross-entropy of one batch and the gradient of every parameter (flat, layout order).

        `tokens` and `targets` are B x T token ids, row-major (packed bytes as shared/tokens.py writes them, or
        an array or list of ints); T is `seq_len` (default block_size).
        """
        self.device.submit(self._forward_backward(tokens, targets, seq_len, loss_slot=0))
        loss = array("f", await self.device.read_buffer(self.losses, 4))[0]
        return loss, await self.read_grads()

    async def train_steps(
        self,
        batches: Iterable[tuple[Any, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        seq_len: int | None = None,
    ) -> list[float]:
        """Run one AdamW step per (tokens, targets) batch; returns each step's loss, read back at the end.

        AdamW follows torch.optim.AdamW and decays every parameter (one parameter group).
        """
        beta1, beta2 = betas
        losses: list[float] = []
        pending = 0
        for tokens, targets in batches:
            dispatches = self._forward_backward(tokens, targets, seq_len, loss_slot=pending)
            self.step += 1
            bias_correction1 = 1 - beta1**self.step
            bias_correction2 = 1 - beta2**self.step
            step_size = lr / bias_correction1
            hyper = struct.pack("<7fI", lr, beta1, beta2, eps, weight_decay, step_size, math.sqrt(bias_correction2),
                                self.num_params)  # the AdamWHyper struct of adamw.wgsl
            self.device.write_buffer(self.adam_hyper, hyper)
            self.device.submit(dispatches + [self._adamw])
            pending += 1
            if pending == LOSS_SLOTS:
                losses += array("f", await self.device.read_buffer(self.losses, 4 * pending)).tolist()
                pending = 0
        if pending:
            losses += array("f", await self.device.read_buffer(self.losses, 4 * pending)).tolist()
        return losses

    async def read_params(self) -> array:
        """The local parameters (flat float32, layout order)."""
        return array("f", await self.device.read_buffer(self.params, 4 * self.num_params))

    async def read_grads(self) -> array:
        """The gradients of the last forward/backward pass (flat float32, layout order)."""
        return array("f", await self.device.read_buffer(self.grads, 4 * self.num_params))

    async def pseudo_gradient_fp32(self) -> bytes:
        """theta_global - theta_local computed on the device, as little-endian float32 bytes (one readback)."""
        if self._pseudo_gradient is None:
            out = self.device.create_buffer(4 * self.num_params, "pseudo-gradient")
            dims = self._dims([self.num_params, 0, 0, 0], "pseudo-gradient dims")
            dispatch = self._dispatch("pseudo_gradient.wgsl", "pseudo_gradient",
                                      {0: self.global_params, 1: self.params, 2: out, 3: dims},
                                      grid_for(ceil_div(self.num_params, 256)))
            self._pseudo_gradient = (out, dispatch)
        out, dispatch = self._pseudo_gradient
        self.device.submit([dispatch])
        return await self.device.read_buffer(out, 4 * self.num_params)

    async def pseudo_gradient_int8(self) -> tuple[array, bytes]:
        """theta_global - theta_local quantised on the device (kernels/quant.py's rule): (scales, codes)."""
        self.codec.quantize(self.global_params, self.params)
        return await self.codec.read()

    # ---- plan building ----------------------------------------------------------------------------------

    def _forward_backward(self, tokens, targets, seq_len: int | None, loss_slot: int) -> list[Dispatch]:
        """Upload one batch and return the dispatches of its forward and backward passes."""
        seq = seq_len or self.cfg.block_size
        width = self.token_width
        token_data, target_data = _token_data(tokens, width), _token_data(targets, width)
        if not 0 < seq <= self.cfg.block_size:
            raise ValueError(f"seq_len {seq} must be in 1..block_size ({self.cfg.block_size})")
        if len(token_data) != len(target_data) or not token_data or len(token_data) % (seq * width):
            raise ValueError(
                f"tokens ({len(token_data)} bytes) and targets ({len(target_data)} bytes) must be the same "
                f"non-zero multiple of seq_len {seq} ids of {width} byte(s)"
            )
        batch = len(token_data) // (seq * width)
        if batch > self.max_batch_size:
            raise ValueError(f"batch of {batch} rows exceeds max_batch_size {self.max_batch_size}")
        pad = bytes(-len(token_data) % 4)
        self.device.write_buffer(self.tokens, token_data + pad)
        self.device.write_buffer(self.targets, target_data + pad)
        self.device.write_buffer(self.loss_slot, array("I", [loss_slot, 0, 0, 0]))
        plan = self._plans.get((batch, seq))
        if plan is None:
            plan = self._plans[(batch, seq)] = self._build_plan(batch, seq)
        return plan

    def _dims(self, fields: list[int], label: str) -> Any:
        buffer = self.device.create_buffer(4 * len(fields), label)
        self.device.write_buffer(buffer, array("I", fields))
        return buffer

    def _dispatch(self, file_name: str, entry: str, buffers: dict[int, Any], workgroups) -> Dispatch:
        if max(workgroups) > MAX_WORKGROUPS_PER_DIMENSION:
            raise ValueError(f"{entry} needs a grid of {workgroups} workgroups, over WebGPU's per-axis limit of "
                             f"{MAX_WORKGROUPS_PER_DIMENSION}; use a smaller batch")
        kernel = self.kernels.get(file_name, entry)
        return Dispatch(kernel, self.device.create_binding(kernel, buffers), tuple(workgroups))

    def _offset(self, name: str) -> int:
        return self.layout[name].offset

    def _matmul(self, entry: str, buffers: dict[int, Any], rows: int, cols: int, inner: int, **offsets) -> Dispatch:
        """A matmul.wgsl dispatch; offsets are given in floats and passed in vec4 units."""
        for name, value in offsets.items():
            if value % 4:
                raise ValueError(f"{name}={value} is not a multiple of 4 floats")
        fields = [
            rows,
            cols,
            inner,
            offsets.get("lhs", 0) // 4,
            offsets.get("rhs", 0) // 4,
            offsets.get("bias", 0) // 4,
            offsets.get("out", 0) // 4,
            (1 if "bias" in offsets else 0) | (2 if 2 in buffers and buffers[2] is not self.no_residual else 0),
        ]
        dims = self._dims(fields, f"{entry} dims")
        if entry == "column_sum":
            grid = (ceil_div(cols // 4, 64), 1, 1)
        else:
            grid = (ceil_div(cols // 4, MATMUL_WORKGROUP), ceil_div(ceil_div(rows, 4), MATMUL_WORKGROUP), 1)
        return self._dispatch("matmul.wgsl", entry, {**buffers, 4: dims}, grid)

    def _linear(self, x, name: str, out, rows: int, cols: int, inner: int, residual=None, bias=True) -> Dispatch:
        offsets = {"rhs": self._offset(name + ".weight")}
        if bias:
            offsets["bias"] = self._offset(name + ".bias")
        buffers = {0: x, 1: self.params, 2: residual or self.no_residual, 3: out}
        return self._matmul("linear_forward", buffers, rows, cols, inner, **offsets)

    def _linear_backward(self, d_out, x, name: str, d_x, rows: int, out_features: int, in_features: int,
                         bias: bool = True) -> list[Dispatch]:
        """Gradients of y = x @ W.T + b: dW = dY.T @ X, db = column sums of dY, dX = dY @ W."""
        weight = self._offset(name + ".weight")
        steps = [
            self._matmul("matmul_grad_weight", {0: d_out, 1: x, 3: self.grads}, out_features, in_features, rows,
                         out=weight),
            self._matmul("matmul_grad_input", {0: d_out, 1: self.params, 3: d_x}, rows, in_features, out_features,
                         rhs=weight),
        ]
        if bias:
            steps.append(
                self._matmul("column_sum", {0: d_out, 3: self.grads}, 1, out_features, rows,
                             out=self._offset(name + ".bias"))
            )
        return steps

    def _layer_norm_dims(self, name: str, rows: int, accumulate: bool) -> Any:
        fields = [rows, self.cfg.n_embd, self._offset(name + ".weight"), self._offset(name + ".bias"),
                  LAYER_NORM_EPS_BITS, int(accumulate), 0, 0]
        return self._dims(fields, f"{name} dims")

    def _layer_norm_forward(self, x, name: str, out, stats, rows: int) -> Dispatch:
        dims = self._layer_norm_dims(name, rows, accumulate=False)
        return self._dispatch("layer_norm.wgsl", "layer_norm_forward",
                              {0: x, 1: self.params, 2: out, 3: stats, 6: dims}, (ceil_div(rows, 64), 1, 1))

    def _layer_norm_backward(self, x, name: str, stats, d_out, rows: int, accumulate: bool) -> list[Dispatch]:
        """Parameter gradients, then dL/dx written (or added) into d_res."""
        dims = self._layer_norm_dims(name, rows, accumulate)
        return [
            self._dispatch("layer_norm.wgsl", "layer_norm_backward_params",
                           {0: x, 3: stats, 4: d_out, 5: self.grads, 6: dims}, (ceil_div(self.cfg.n_embd, 64), 1, 1)),
            self._dispatch("layer_norm.wgsl", "layer_norm_backward_input",
                           {0: x, 1: self.params, 2: self.d_res, 3: stats, 4: d_out, 6: dims}, (ceil_div(rows, 64), 1, 1)),
        ]

    def _build_plan(self, batch: int, seq: int) -> list[Dispatch]:
        cfg = self.cfg
        c, v, rows = cfg.n_embd, cfg.vocab_size, batch * seq
        token_bits = 8 * self.token_width
        steps: list[Dispatch] = []

        embed_dims = self._dims(
            [rows, seq, c, v, cfg.block_size, self._offset("wte.weight"), self._offset("wpe.weight"), token_bits],
            "embed dims"
        )
        attention_dims = self._dims([batch, seq, cfg.n_head, c // cfg.n_head, c, 0, 0, 0], "attention dims")
        gelu_dims = self._dims([rows * 4 * c, 0, 0, 0], "gelu dims")
        gelu_grid = grid_for(ceil_div(rows * 4 * c, 256))
        attention_grid = (ceil_div(batch * cfg.n_head * seq, 64), 1, 1)

        # ---- forward ----
        steps.append(self._dispatch("embedding.wgsl", "embed_forward",
                                    {0: self.tokens, 1: self.params, 2: self.blocks[0].x if cfg.n_layer else self.x_final,
                                     4: embed_dims}, (ceil_div(rows * c, 256), 1, 1)))
        for i, block in enumerate(self.blocks):
            h = f"h.{i}."
            x_next = self.blocks[i + 1].x if i + 1 < cfg.n_layer else self.x_final
            steps += [
                self._layer_norm_forward(block.x, h + "ln_1", block.ln_1, block.ln_1_stats, rows),
                self._linear(block.ln_1, h + "attn.c_attn", block.qkv, rows, 3 * c, c),
                self._dispatch("attention.wgsl", "attention_forward",
                               {0: block.qkv, 1: block.probs, 2: block.attn_y, 5: attention_dims}, attention_grid),
                self._linear(block.attn_y, h + "attn.c_proj", block.x_mid, rows, c, c, residual=block.x),
                self._layer_norm_forward(block.x_mid, h + "ln_2", block.ln_2, block.ln_2_stats, rows),
                self._linear(block.ln_2, h + "mlp.c_fc", block.fc_pre, rows, 4 * c, c),
                self._dispatch("gelu.wgsl", "gelu_forward", {0: block.fc_pre, 1: block.fc_act, 2: gelu_dims}, gelu_grid),
                self._linear(block.fc_act, h + "mlp.c_proj", x_next, rows, c, 4 * c, residual=block.x_mid),
            ]
        steps.append(self._layer_norm_forward(self.x_final, "ln_f", self.ln_f, self.ln_f_stats, rows))
        steps.append(self._linear(self.ln_f, "lm_head", self.logits, rows, v, c, bias=False))
        loss_dims = self._dims([rows, v, token_bits, 0], "cross-entropy dims")
        steps.append(self._dispatch("cross_entropy.wgsl", "cross_entropy_forward_backward",
                                    {0: self.logits, 1: self.targets, 2: self.row_loss, 5: loss_dims},
                                    (ceil_div(rows, 64), 1, 1)))
        steps.append(self._dispatch("cross_entropy.wgsl", "loss_mean",
                                    {2: self.row_loss, 3: self.losses, 4: self.loss_slot, 5: loss_dims}, (1, 1, 1)))

        # ---- backward (self.logits now holds dL/dlogits) ----
        steps += self._linear_backward(self.logits, self.ln_f, "lm_head", self.d_ln, rows, v, c, bias=False)
        steps += self._layer_norm_backward(self.x_final, "ln_f", self.ln_f_stats, self.d_ln, rows, accumulate=False)
        for i in reversed(range(cfg.n_layer)):
            block, h = self.blocks[i], f"h.{i}."
            steps += self._linear_backward(self.d_res, block.fc_act, h + "mlp.c_proj", self.d_fc, rows, c, 4 * c)
            steps.append(self._dispatch("gelu.wgsl", "gelu_backward",
                                        {0: block.fc_pre, 1: self.d_fc, 2: gelu_dims}, gelu_grid))
            steps += self._linear_backward(self.d_fc, block.ln_2, h + "mlp.c_fc", self.d_ln, rows, 4 * c, c)
            steps += self._layer_norm_backward(block.x_mid, h + "ln_2", block.ln_2_stats, self.d_ln, rows, accumulate=True)
            steps += self._linear_backward(self.d_res, block.attn_y, h + "attn.c_proj", self.d_attn_y, rows, c, c)
            attention_backward = {0: block.qkv, 1: block.probs, 2: self.d_qkv, 3: self.d_attn_y, 4: self.d_scores,
                                  5: attention_dims}
            steps.append(self._dispatch("attention.wgsl", "attention_backward_query", attention_backward, attention_grid))
            steps.append(self._dispatch("attention.wgsl", "attention_backward_key_value", attention_backward,
                                        attention_grid))
            steps += self._linear_backward(self.d_qkv, block.ln_1, h + "attn.c_attn", self.d_ln, rows, 3 * c, c)
            steps += self._layer_norm_backward(block.x, h + "ln_1", block.ln_1_stats, self.d_ln, rows, accumulate=True)
        steps.append(self._dispatch("embedding.wgsl", "embed_backward_wte",
                                    {0: self.tokens, 2: self.grads, 3: self.d_res, 4: embed_dims},
                                    grid_for(ceil_div(v * ceil_div(c, 64), 64))))
        steps.append(self._dispatch("embedding.wgsl", "embed_backward_wpe",
                                    {2: self.grads, 3: self.d_res, 4: embed_dims},
                                    (ceil_div(cfg.block_size * c, 256), 1, 1)))
        return steps
