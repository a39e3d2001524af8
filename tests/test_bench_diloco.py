"""bench/bench_diloco.py's baseline: synchronous data parallel replays the very batches the simulated workers trained."""

from __future__ import annotations

import pytest

from bench.bench_diloco import run_data_parallel
from server.corpus import load_corpus
from server.sim import SimOptions, run_simulation

CORPUS_BYTES = 1_000_000


def test_with_one_worker_and_a_plain_outer_step_diloco_is_the_data_parallel_baseline():
    # one worker, one round, outer lr 1 without momentum, nothing compressed either way: the coordinator's new model
    # is the worker's own, so the baseline (a fresh AdamW over the same batches) must land on the same loss
    options = SimOptions(workers=1, rounds=1, inner_steps=4, batch=4, outer_lr=1.0, outer_momentum=0.0, codec="fp32",
                         delta_codec="fp32", corpus_bytes=CORPUS_BYTES, peers=0, out=None)
    result = run_simulation(options)
    ddp = run_data_parallel(result.trainings, load_corpus(None, CORPUS_BYTES), options)
    assert ddp["tokens"] == result.summary["tokens_trained"] == 4 * 4 * 64
    assert ddp["bytes_per_token"] == result.summary["ddp_bytes_per_token"]
    assert ddp["val_loss"] == pytest.approx([r["val_loss"] for r in result.rows], abs=1e-5)
    assert ddp["val_loss"][-1] < ddp["val_loss"][0] - 0.2
