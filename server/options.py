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


def fraction(upper: float, closed: bool = False):
    """An argparse type: a number in [0, upper) ([0, upper] when `closed`), with a clear message otherwise."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (0.0 <= value <= upper if closed else 0.0 <= value < upper):
            raise argparse.ArgumentTypeError(f"must be a fraction in [0, {upper}{']' if closed else ')'}, got {value}")
        return value

    return parse


share_option = fraction(1.0, closed=True)  # a share of updates, 0 to 1 inclusive


def codec_option(text: str) -> str:
    """An argparse type: a codec option, `name[:key=value,...]`, checked by shared.compress.parse_codec."""
    from shared import compress

    try:
        compress.parse_codec(text)
    except compress.CodecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


CODEC_HELP = ("how nodes send pseudo-gradients: fp32, fp16, int8, topk or sparseloco, optionally with parameters, "
              "e.g. int8:block=128, topk:fraction=0.01,deflate=false or sparseloco:chunk=4096,k=64,bits=2 (int8 and "
              "topk deflate by default)")


def listen_option(text: str) -> tuple[str, int]:
    """An argparse type: the trainer's --listen HOST:PORT (server/net/blob_http.py's parse_listen)."""
    from server.net.blob_http import ListenError, parse_listen

    try:
        return parse_listen(text)
    except ListenError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def display_name_option(text: str) -> str:
    """An argparse type: the trainer's --name or --team, as a Hello carries it (shared.wire.check_display_name)."""
    from shared.wire import FieldError, check_display_name

    try:
        check_display_name(text, "the value")
    except FieldError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def model_option(text: str) -> str:
    """An argparse type: a named model size or the custom form, in its one spelling (shared.model.canonical_model)."""
    from shared.model import ModelSpecError, canonical_model

    try:
        return canonical_model(text)
    except ModelSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def ice_server_url(text: str) -> str:
    """An argparse type: a stun:, turn: or turns: URL (server.net.rtc.parse_ice_url), with what is wrong."""
    from server.net import rtc

    try:
        return rtc.parse_ice_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def tokenizer_option(text: str) -> str:
    """An argparse type: bytes or bpe:VOCAB (server.tokenizer.parse_tokenizer), with what is wrong."""
    from server.tokenizer import TokenizerError, parse_tokenizer

    try:
        return str(parse_tokenizer(text))
    except TokenizerError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
