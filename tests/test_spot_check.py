"""Spot checks: every node draws one batch schedule, an update is re-executable from the round's start alone, and
judge() passes honest updates (torch and WGSL, under each codec) and fails fabricated ones."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from browser.browser_node import sample_batches
from kernels.trainer import DeviceTrainer
from server.codecs import TorchErrorFeedback, decode_numpy
from server.model import GPT, flat_parameters, init_parameters
from server.coordinator.spot_check import TOLERANCE, SpotCheckError, judge, reexecute
from server.trainer import Trainer, TrainerOptions
from server.training import byte_tensor
from shared import compress
from shared.batches import ADAMW_BETAS, ADAMW_EPS, ScheduleError, batch_seed, batch_starts, tokens_allowed
from shared.model import MODEL_SIZES, num_parameters
from shared.wire import RoundOpen

CFG = MODEL_SIZES["tiny"]
SHARD = Path(argparse.__file__).read_bytes()[:32768]  # real text; every test compares two runs on these bytes
NODE = "ab" * 32
ROUND = 3
ASSIGNMENT = dict(steps=4, batch_size=2, seq_len=64, lr=3e-3, weight_decay=0.1)
FP32 = {"name": "fp32", "params": {}}


def start_params(seed: int = 0) -> np.ndarray:
    model = GPT(CFG)
    init_parameters(model, seed)
    return flat_parameters(model).numpy()


def honest_update(node_id: str = NODE, round_: int = ROUND, params: np.ndarray | None = None, **changes) -> np.ndarray:
    params = start_params() if params is None else params
    return reexecute(CFG, params, SHARD, node_id, round_, **{**ASSIGNMENT, **changes})


def encoded_with_error_feedback(codec: str, updates: list[np.ndarray]) -> np.ndarray:
    """What the coordinator decodes from the last of a node's updates, the earlier ones leaving their residual."""
    spec = compress.parse_codec(codec)
    feedback = TorchErrorFeedback(updates[0].size)
    for update in updates:
        payload = feedback.encode(spec, torch.from_numpy(update))
    return decode_numpy(spec, payload, updates[-1].size)


# -- the batch schedule ---------------------------------------------------------------------------------------


def test_batch_schedule_is_the_one_browser_nodes_drew_before():
    # computed with browser/browser_node.py's batch_seed and sample_batches before they moved to shared/batches.py
    seed = batch_seed("ab" * 32, 3)
    assert seed == 7661158897886837684
    assert batch_starts(1024, 3, 2, 8, seed) == [[390, 359], [943, 131], [530, 247]]


def test_browser_batches_are_the_windows_at_the_shared_starts():
    shard = bytes(range(256)) * 4
    starts = batch_starts(len(shard), 3, 2, 8, 42)
    batches = sample_batches(shard, 3, 2, 8, 42)
    for (tokens, targets), rows in zip(batches, starts):
        assert tokens == b"".join(shard[s : s + 8] for s in rows)
        assert targets == b"".join(shard[s + 1 : s + 9] for s in rows)


def test_batch_starts_keep_every_window_and_its_target_inside_the_shard():
    starts = [s for step in batch_starts(100, 50, 8, 30, seed=7) for s in step]
    assert min(starts) >= 0 and max(starts) + 30 + 1 <= 100
    assert len(set(starts)) > 40  # spread over the shard, not one window


def test_batch_starts_refuse_a_shard_too_short_for_one_window():
    with pytest.raises(ScheduleError, match="too short"):
        batch_starts(65, 1, 1, 64, seed=0)


def test_tokens_allowed_is_steps_times_batch_times_sequence():
    assert tokens_allowed(20, 16, 64) == 20_480


# -- re-execution -----------------------------------------------------------------------------------------------


def trainer_update(trainer: Trainer, params: np.ndarray, round_: int) -> np.ndarray:
    """One round of the PyTorch trainer as its node runs it (shared/node.py's schedule, server/trainer.py's inner
    steps and fp32 encoding) from `params`; the shard is held, as after its first download."""
    node, port = trainer.node, trainer.port
    node.model, node.shards[0] = params.copy(), byte_tensor(SHARD)
    config = {"seq_len": ASSIGNMENT["seq_len"], "lr": ASSIGNMENT["lr"], "weight_decay": ASSIGNMENT["weight_decay"],
              "codec": FP32}
    work = asyncio.run(node._work(RoundOpen(round_, "0" * 64, "0" * 128, config, 0, 0.0), ASSIGNMENT["steps"],
                                  ASSIGNMENT["batch_size"]))
    asyncio.run(port.train(node, work))
    assert work.steps * work.batch * work.seq_len == tokens_allowed(ASSIGNMENT["steps"], ASSIGNMENT["batch_size"],
                                                                    ASSIGNMENT["seq_len"])
    return decode_numpy(work.spec, asyncio.run(port.encode(node, work)), params.size)


@pytest.fixture
def trainer() -> Trainer:
    trainer = Trainer(TrainerOptions(coordinator="http://127.0.0.1:9", device="cpu", progress=False))
    trainer.port.prepare({"params": num_parameters(CFG), "model": "tiny"}, CFG)
    return trainer


def test_reexecute_is_the_trainers_update_bit_for_bit(trainer):
    params = start_params()
    claimed = trainer_update(trainer, params, ROUND)
    recomputed = honest_update(trainer.key.node_id, ROUND, params)
    assert np.array_equal(claimed, recomputed)
    assert judge(claimed, recomputed, FP32).ok


def test_trainer_update_does_not_depend_on_earlier_rounds(trainer):
    params = start_params()
    first = trainer_update(trainer, params, ROUND)
    trainer_update(trainer, start_params(seed=1), ROUND + 1)  # a round in between, from other parameters
    assert np.array_equal(trainer_update(trainer, params, ROUND), first)


def test_reexecute_refuses_parameters_of_another_model():
    with pytest.raises(SpotCheckError, match="parameters"):
        reexecute(CFG, np.zeros(10, np.float32), SHARD, NODE, ROUND, **ASSIGNMENT)


# -- judging ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def honest() -> np.ndarray:
    return honest_update()


def fabricated(name: str, honest: np.ndarray) -> np.ndarray:
    if name == "noise of the same norm":
        noise = np.random.default_rng(0).standard_normal(honest.size).astype(np.float32)
        return noise * (np.linalg.norm(honest) / np.linalg.norm(noise))
    if name == "another node's update":
        return honest_update(node_id="cd" * 32)
    if name == "sign-flipped":
        return -honest
    if name == "scaled 10x":
        return 10 * honest
    if name == "scaled 1.1x":
        return np.float32(1.1) * honest
    if name == "zeros":
        return np.zeros_like(honest)
    if name == "H halved":
        return honest_update(steps=ASSIGNMENT["steps"] // 2)
    raise ValueError(name)


FABRICATIONS = ["noise of the same norm", "another node's update", "sign-flipped", "scaled 10x", "scaled 1.1x", "zeros",
                "H halved"]


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("fabrication", FABRICATIONS)
def test_fabricated_update_fails(honest, fabrication, codec):
    claimed = encoded_with_error_feedback(codec, [fabricated(fabrication, honest)])
    verdict = judge(claimed, honest, compress.parse_codec(codec).to_dict())
    assert not verdict.ok
    assert "cosine" in verdict.evidence["reason"] or "norm ratio" in verdict.evidence["reason"]
    assert verdict.evidence["relative_error"] == verdict.relative_error


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_honest_update_passes_under_a_lossy_codec_with_the_previous_rounds_residual(honest, codec):
    previous = honest_update(round_=ROUND - 1)
    claimed = encoded_with_error_feedback(codec, [previous, honest])
    verdict = judge(claimed, honest, compress.parse_codec(codec).to_dict())
    assert verdict.ok, verdict.evidence
    assert verdict.relative_error > 0  # the codec did lose something, and the tolerance absorbed it


def test_topk_updates_are_not_judged(honest):
    claimed = encoded_with_error_feedback("topk", [-honest])
    verdict = judge(claimed, honest, compress.parse_codec("topk").to_dict())
    assert verdict.ok
    assert verdict.evidence["skipped"] == "topk"
    assert verdict.evidence["support"] == compress.topk_count(compress.parse_codec("topk"), honest.size)


def test_judge_refuses_updates_of_different_sizes(honest):
    with pytest.raises(SpotCheckError, match="values"):
        judge(honest[:-1], honest, FP32)


def test_wgsl_trainer_update_passes_against_torch_reexecution(device):
    """The browser's path: its batches, fresh AdamW moments, the node's constants, the pseudo-gradient on the GPU."""
    params = start_params()
    recomputed = honest_update(params=params)
    steps, batch, seq = ASSIGNMENT["steps"], ASSIGNMENT["batch_size"], ASSIGNMENT["seq_len"]
    trainer = DeviceTrainer(device, CFG, params.tobytes(), max_batch_size=batch)
    # a trainer that trained before, as a browser's does: the round must not inherit its AdamW moments
    asyncio.run(trainer.train_steps(sample_batches(SHARD, 2, batch, seq, 1), 1e-2, seq_len=seq))
    trainer.load_params(params.tobytes())
    trainer.reset_optimizer()
    asyncio.run(trainer.train_steps(sample_batches(SHARD, steps, batch, seq, batch_seed(NODE, ROUND)),
                                    ASSIGNMENT["lr"], betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                    weight_decay=ASSIGNMENT["weight_decay"], seq_len=seq))
    claimed = np.frombuffer(asyncio.run(trainer.pseudo_gradient_fp32()), "<f4")

    verdict = judge(claimed, recomputed, FP32)

    assert verdict.ok, verdict.evidence
    # well inside the margins the tolerance was set with
    assert 1 - verdict.cosine < (1 - TOLERANCE.min_cosine) / 70
    assert abs(verdict.evidence["norm_ratio"] - 1) < TOLERANCE.max_norm_deviation / 100
    scales, codes = asyncio.run(trainer.pseudo_gradient_int8())  # the browser's int8 payload, quantised on the GPU
    spec = compress.parse_codec("int8:deflate=false")
    assert judge(decode_numpy(spec, scales.tobytes() + codes, claimed.size), recomputed, spec.to_dict()).ok
