"""Fast aggregation rules and codecs against the memory floor measured in the same run.

Never assert a speed target here, and never hold more than a few copies of the (n, d) matrix (< 6 GiB at
the defaults).

usage: python -m bench.bench_aggregate [--n 32] [--d 10000000] [--f N/3] [--repeats 2] [--threads 1] [--seed 0]

Rules: each of server.aggregation.RULES on an (n, d) float32 matrix of Gaussian updates around a shared
direction, with f tolerated inputs (default n // 3, the issue's third of liars). The floor is the time to
read that matrix once (a row sum in torch). Each rule runs once on a small matrix first, so that compiling
its numba kernels (or loading them from numba's cache) is not timed; that first-call time is printed. The
rules' kernels use as many threads as torch (--threads), as in the coordinator, and so does the floor.
Codecs: torch encode and numpy decode of one d-vector per codec (Gaussian, so deflate gains less than on
real pseudo-gradients), in MB/s of float32 input, against a plain memcpy of the same 4d bytes. Times are the
best of --repeats.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from server.aggregation import RULES
from server.codecs import decode_numpy, encode_torch
from shared.compress import CodecSpec, format_codec, max_wire_size

CODEC_SPECS = [
    CodecSpec("fp32"),
    CodecSpec("fp16"),
    CodecSpec("int8", {"block": 256}),
    CodecSpec("int8", {"block": 256, "deflate": True}),  # what a job's "int8" means
    CodecSpec("topk"),  # the default fraction, 0.02
    CodecSpec("topk", {"deflate": True}),  # what a job's "topk" means
]


def best_time(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def make_updates(n: int, d: int, seed: int) -> np.ndarray:
    """Honest-looking pseudo-gradients: one shared direction plus per-node noise of the same size."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(n, d, generator=generator)
    matrix += torch.randn(d, generator=generator)
    return matrix.numpy()


def warm_up(n: int, f: int) -> None:
    """Run every rule once on a small matrix: compiles its kernels, or loads them from numba's cache."""
    small = make_updates(n, 1000, 0)
    start = time.perf_counter()
    for name, rule in RULES.items():
        rule(small, f=0 if name == "mean" else f)
    print(f"first calls of every rule (compile or load kernels): {time.perf_counter() - start:.1f} s")


def bench_rules(matrix: np.ndarray, f: int, repeats: int) -> None:
    warm_up(matrix.shape[0], f)
    tensor = torch.from_numpy(matrix)
    floor = best_time(lambda: tensor.sum(dim=1), max(repeats, 3))
    gib = matrix.nbytes / 2**30
    print(f"floor: read the ({matrix.shape[0]}, {matrix.shape[1]}) matrix once ({gib:.2f} GiB): {floor:.3f} s "
          f"({gib / floor:.1f} GiB/s)")
    print(f"{'rule':<10} {'seconds':>8} {'x floor':>8}  discarded (f={f})")
    for name, rule in RULES.items():
        params = {"f": 0 if name == "mean" else f}
        result = None

        def run():
            nonlocal result
            result = rule(matrix, **params)

        seconds = best_time(run, repeats)
        print(f"{name:<10} {seconds:8.3f} {seconds / floor:8.1f}  {result.discarded}")


def bench_codecs(vector: torch.Tensor, repeats: int) -> None:
    d = vector.numel()
    source = vector.numpy()
    target = np.empty_like(source)
    megabytes = source.nbytes / 1e6
    memcpy = best_time(lambda: np.copyto(target, source), max(repeats, 3))
    print(f"memcpy of {megabytes:.0f} MB: {megabytes / memcpy:.0f} MB/s")
    print(f"{'codec':<30} {'wire MB':>8} {'x fewer':>8} {'encode MB/s':>12} {'x memcpy':>9} {'decode MB/s':>12} "
          f"{'x memcpy':>9}")
    for spec in CODEC_SPECS:
        data = encode_torch(spec, vector)
        assert len(data) <= max_wire_size(spec, d)
        encode = best_time(lambda: encode_torch(spec, vector), repeats)
        decode = best_time(lambda: decode_numpy(spec, data, d), repeats)
        label = format_codec(spec)
        print(f"{label:<30} {len(data) / 1e6:8.2f} {source.nbytes / len(data):8.1f} {megabytes / encode:12.0f} "
              f"{memcpy / encode:9.1f} {megabytes / decode:12.0f} {memcpy / decode:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="updates to aggregate")
    parser.add_argument("--d", type=int, default=10_000_000, help="values per update")
    parser.add_argument("--f", type=int, default=None, help="Byzantine inputs tolerated (default n // 3)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the floor uses the same)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    f = args.n // 3 if args.f is None else args.f
    print(f"n={args.n} d={args.d} f={f} threads={args.threads} repeats={args.repeats}")
    matrix = make_updates(args.n, args.d, args.seed)
    bench_rules(matrix, f, args.repeats)
    bench_codecs(torch.from_numpy(matrix[0]), args.repeats)


if __name__ == "__main__":
    main()
