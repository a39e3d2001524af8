"""bench/bench_diloco.py: its baseline (synchronous data parallel replays the very batches the simulated workers
trained), and its --overlap jobs."""

from __future__ import annotations

import pytest

from bench.bench_diloco import main, run_data_parallel
from server.corpus import load_corpus
from server.sim import BYTES_PER_FP32, SimOptions, run_simulation
from shared.model import model_config, num_parameters

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


def table_row(out: str, name: str) -> list[str]:
    """The cells of the bench's summary-table row for `name` (e.g. "DiLoCo fp32")."""
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, f"no single row {name!r} in:\n{out}"
    return [cell.strip() for cell in rows[0]]


def test_overlap_adds_a_job_per_codec_that_uploads_the_same_bytes_per_token(capsys):
    # overlapped rounds change which model the workers train on, not what they send: the same fp32 updates, so the
    # same bytes per token; the delayed outer step shows in the loss
    main(["--workers", "2", "--inner-steps", "2", "--rounds", "3", "--batch", "4", "--codec", "fp32", "--overlap",
          "--corpus-bytes", str(CORPUS_BYTES)])
    out = capsys.readouterr().out
    plain, overlapped = table_row(out, "DiLoCo fp32"), table_row(out, "DiLoCo fp32, overlapped")
    per_token = BYTES_PER_FP32 * num_parameters(model_config("tiny")) / (2 * 4 * 64)  # one fp32 update, H x batch
    assert overlapped[3] == plain[3] == f"{per_token:,.2f}"  # x 64 tokens a worker a round
    assert float(overlapped[1]) != float(plain[1])
    assert "fp32: x" in out and "x1.000 bytes" in out
