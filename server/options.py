"""Command-line option types shared by the coordinator's, trainer's and simulator's parsers."""

from __future__ import annotations

import argparse


def int_at_least(minimum: int):
    """An argparse type: an integer no smaller than `minimum`, with a clear message otherwise."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}")
        return value

    return parse


def share_option(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value}")
    return value


def codec_option(text: str) -> str:
    """An argparse type: a codec option, `name[:key=value,...]`, checked by shared.compress.parse_codec."""
    from shared import compress

    try:
        compress.parse_codec(text)
    except compress.CodecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


CODEC_HELP = ("how nodes send pseudo-gradients: fp32, fp16, int8 or topk, optionally with parameters, e.g. "
              "int8:block=128 or topk:fraction=0.01,deflate=false (int8 and topk deflate by default)")
