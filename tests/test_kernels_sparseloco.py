"""The sparseloco encoder in WGSL (kernels/sparseloco.wgsl, kernels/sparseloco_codec.py) puts the same bytes on the
wire as shared/compress.py's reference and the trainer's torch encoder, and keeps the same error-feedback residual;
the browser's port encodes with it straight from the trainer's buffers.

Runs on wgpu-py's default adapter (lavapipe in CI). No adapter is a failure, never a skip.
"""

from __future__ import annotations

import asyncio
import math
import random
from array import array
from types import SimpleNamespace

import pytest
import torch

from browser.browser_node import BrowserPort
from kernels.sparseloco_codec import DeviceSparseLoCo
from server.codecs import encode_torch
from shared import compress
from shared.batches import batch_starts
from shared.model import GPTConfig, num_parameters
from shared.node import Node, Work


def run(coroutine):
    return asyncio.run(coroutine)


def tie_prone_values(count: int, seed: int) -> array:
    """Mixed scales with many equal magnitudes of both signs, runs of zeros (+0 and -0) and subnormals."""
    rng = random.Random(seed)
    values = [rng.gauss(0.0, 10.0 ** rng.randint(-6, 1)) for _ in range(count)]
    for i in rng.sample(range(count), count // 4):
        values[i] = rng.choice([0.0, -0.0])
    for i in rng.sample(range(count), count // 8):
        values[i] = rng.choice([1.5, -1.5, 3.0, -3.0])  # ties in magnitude, across the selection's boundary too
    for i in rng.sample(range(count), 16):
        values[i] = rng.choice([1e-40, -1e-40, 1e-45])
    values[:64] = [0.0] * 64  # a run of zeros: a chunk of C <= 64 sends zeros
    return array("f", values)


SHAPES = [  # (codec option, n): whole and partial chunks, k = C, C not a power of two, C = 1
    ("sparseloco", 10_007),
    ("sparseloco:chunk=1000,k=37", 5_500),
    ("sparseloco:chunk=64,k=64", 300),
    ("sparseloco:chunk=48,k=40", 200),
    ("sparseloco:chunk=256,k=32", 1000),
    ("sparseloco:chunk=1,k=1", 70),
    ("sparseloco:chunk=4096,k=3000,deflate=true", 4_100),
]


@pytest.mark.parametrize(("option", "n"), SHAPES)
def test_wgsl_encoder_equals_reference_and_torch_byte_for_byte_with_the_same_residual(device, option, n):
    spec = compress.parse_codec(option)
    codec = DeviceSparseLoCo(device, spec, n)
    reference = compress.ErrorFeedback(n)
    for round_ in range(3):  # the first round is a plain encode; later ones carry the residual
        values = tie_prone_values(n, seed=round_)
        expected = reference.encode(spec, values)
        if round_ == 0:
            from_torch = encode_torch(spec, torch.frombuffer(values, dtype=torch.float32))
            assert expected == compress.encode(spec, values) == from_torch
        assert run(codec.encode(values)) == expected, f"round {round_}"
        assert run(codec.read_residual()).tobytes() == reference.residual.tobytes(), f"round {round_}"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_value_is_refused_and_the_residual_stays(device, bad):
    spec, n = compress.parse_codec("sparseloco:chunk=256,k=8"), 1000
    codec = DeviceSparseLoCo(device, spec, n)
    run(codec.encode(tie_prone_values(n, seed=1)))
    residual = run(codec.read_residual())
    values = tie_prone_values(n, seed=2)
    values[700], values[900] = bad, bad
    with pytest.raises(compress.CodecError, match="value 700 is not finite"):
        run(codec.encode(values))
    assert run(codec.read_residual()) == residual


CFG = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
SHARD = bytes(random.Random(3).randrange(256) for _ in range(4096))


def work(round_: int, codec: str, model: bytes) -> Work:
    steps, batch, seq = 2, 2, 16
    return Work(round_, steps, batch, seq, 1e-2, 0.0, batch_starts(len(SHARD), steps, batch, seq, round_), SHARD,
                model, compress.parse_codec(codec))


def test_the_browser_port_encodes_sparseloco_on_the_gpu_and_hands_its_residual_to_a_cpu_codec(device):
    # The page's port with the real WGSL trainer: each round's payload is the reference ErrorFeedback's encoding
    # of the pseudo-gradient the trainer computed, and a later int8 round carries on from the GPU's residual.
    n = num_parameters(CFG)
    port = BrowserPort(SimpleNamespace(report=lambda text: None), device)
    port.prepare({}, CFG)
    reference = compress.ErrorFeedback(n)
    model = array("f", (random.Random(4).gauss(0, 0.02) for _ in range(n))).tobytes()
    node = Node(port, "ab" * 32)  # the real node's between-steps hook, before its session (nothing to tell)
    for round_, codec in enumerate(["sparseloco:chunk=512,k=16", "sparseloco:chunk=512,k=16", "int8"]):
        round_work = work(round_, codec, model)
        run(port.train(node, round_work))
        pseudo_gradient = array("f", run(port.trainer.pseudo_gradient_fp32()))
        assert run(port.encode(node, round_work)) == reference.encode(round_work.spec, pseudo_gradient), codec
        held = port.feedback.residual if codec == "int8" else run(port.device_feedback.read_residual())
        assert held.tobytes() == reference.residual.tobytes()
    assert port.device_feedback is None
