"""Bytes per value of every pseudo-gradient codec on one model's parameter count, against fp32 and top-k.

Never assert a target here (tests hold the claims); this prints what one encoding of one vector measured.

usage: python -m bench.bench_codec_bytes [--model base] [--seed 0]

The vector is Gaussian (scale 1e-3, a pseudo-gradient's order) with the model's parameter count; only the deflated
codecs' sizes depend on the values (fp32, fp16, raw int8, raw top-k and sparseloco are fixed by n and the spec).
"""

from __future__ import annotations

import argparse

import torch

from server.codecs import encode_torch
from shared.compress import encoded_size, parse_codec
from shared.model import MODEL_SIZES, num_parameters

CODECS = ["fp32", "fp16", "int8:deflate=false", "int8", "topk:deflate=false", "topk", "sparseloco",
          "sparseloco:deflate=true"]
"""Each codec as a job names it, and without (or with) deflate, to see what that stage adds."""


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_codec_bytes", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base", choices=sorted(MODEL_SIZES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    n = num_parameters(MODEL_SIZES[args.model])
    vector = torch.randn(n, generator=torch.Generator().manual_seed(args.seed)) * 1e-3
    sizes = {codec: len(encode_torch(parse_codec(codec), vector)) for codec in CODECS}
    assert sizes["sparseloco"] == encoded_size(parse_codec("sparseloco"), n)
    print(f"{args.model}: {n:,} values")
    print(f"{'codec':<26} {'bytes':>12} {'bytes/value':>12} {'x fewer than fp32':>18} {'x fewer than topk':>18}")
    for codec, size in sizes.items():
        print(f"{codec:<26} {size:12,} {size / n:12.4f} {sizes['fp32'] / size:18.1f} {sizes['topk'] / size:18.2f}")


if __name__ == "__main__":
    main()
