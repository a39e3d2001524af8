"""Copy detection: whether an update is a near-copy of one that arrived earlier in the same round.

One computation sent under several keys must be paid, weighed and counted once. Never call two updates copies
on anything weaker than the thresholds below: an honest node flagged as a copier loses reputation it earned.
"""

from __future__ import annotations

import numpy as np

# Two honest nodes train on different shards with different batch seeds: their pseudo-gradients agree in
# direction (the loss falls for both) but not to this degree. In the simulator's honest runs (tiny model,
# 4 workers, H 2 to 20) the largest pairwise cosine was well below it; see the issue note for the numbers.
COPY_COSINE = 0.99
# Top-k updates: a copier may keep the indices and change the values, which cosine alone would miss.
# Honest nodes' top-k supports overlap far less than this (Jaccard index of the transmitted coordinates).
COPY_SUPPORT_OVERLAP = 0.95


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity in float64 (0 when either vector is zero)."""
    na = float(np.linalg.norm(a.astype(np.float64)))
    nb = float(np.linalg.norm(b.astype(np.float64)))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)) / (na * nb))


def support_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard index of the two vectors' nonzero coordinates (0 when both are empty)."""
    sa, sb = np.flatnonzero(a), np.flatnonzero(b)
    union = np.union1d(sa, sb).size
    return 0.0 if union == 0 else np.intersect1d(sa, sb, assume_unique=True).size / union


def copy_of(values: np.ndarray, codec: dict, earlier: list[np.ndarray]) -> tuple[int, str] | None:
    """(index into `earlier`, the measure that matched) of the first earlier update this one copies, or None.

    Dense updates are compared by cosine; top-k updates also by how much their transmitted coordinates overlap.
    A zero update copies nothing: it carries no work to copy, and the rules judge it on its own.
    """
    sparse = codec.get("name") == "topk"
    for index, other in enumerate(earlier):
        c = cosine(values, other)
        if c > COPY_COSINE:
            return index, f"cosine {c:.4f} > {COPY_COSINE}"
        if sparse:
            overlap = support_overlap(values, other)
            if overlap > COPY_SUPPORT_OVERLAP:
                return index, f"{overlap:.1%} of the same coordinates > {COPY_SUPPORT_OVERLAP:.0%}"
    return None
