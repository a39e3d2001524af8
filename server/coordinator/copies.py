"""Copy detection: whether an update is a near-copy of one that arrived earlier in the same round.

One computation sent under several keys must be paid, weighed and counted once. Never call two updates copies
on anything weaker than the thresholds below: an honest node flagged as a copier loses reputation it earned.
"""

from __future__ import annotations

import numpy as np
import torch

# Two honest nodes train on different shards with different batch seeds: their pseudo-gradients agree in
# direction (the loss falls for both) but not to this degree. In the simulator's honest runs (tiny model,
# 4 workers, H 2 to 20) the largest pairwise cosine was well below it; see the issue note for the numbers.
COPY_COSINE = 0.99
# Top-k updates: a copier may keep the indices and change the values, which cosine alone would miss.
# Honest nodes' top-k supports overlap far less than this (Jaccard index of the transmitted coordinates).
COPY_SUPPORT_OVERLAP = 0.95
SPARSE_CODECS = ("topk", "sparseloco")  # the codecs whose updates send some coordinates only


def cosines(rows: list[np.ndarray]) -> np.ndarray:
    """Every pair's cosine similarity (0 where a vector is zero), from one float32 Gram matrix: a round's n
    updates cost one n x n x d product (torch's threads), never a pass per pair. float32 sums are accurate to
    far better than the margin between honest agreement and COPY_COSINE."""
    matrix = torch.from_numpy(np.stack([np.asarray(r, np.float32) for r in rows]))
    gram = (matrix @ matrix.T).double().numpy()
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    scale = np.outer(norms, norms)
    return np.divide(gram, scale, out=np.zeros_like(gram), where=scale > 0)


def support_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard index of the two vectors' nonzero coordinates (0 when both are empty)."""
    sa, sb = np.flatnonzero(a), np.flatnonzero(b)
    union = np.union1d(sa, sb).size
    return 0.0 if union == 0 else np.intersect1d(sa, sb, assume_unique=True).size / union


def find_copies(rows: list[np.ndarray], codecs: list[dict]) -> dict[int, tuple[int, str]]:
    """For each update (in arrival order) that copies an earlier one: index -> (the index of the first earlier
    update it copies that is no copy itself, the measure that matched).

    Dense updates are compared by cosine; top-k updates also by how much their transmitted coordinates overlap.
    A zero update copies nothing: it carries no work to copy, and the rules judge it on its own.
    """
    if len(rows) < 2:
        return {}
    similarity = cosines(rows)
    found: dict[int, tuple[int, str]] = {}
    originals: list[int] = []
    for i in range(len(rows)):
        sparse = codecs[i].get("name") in SPARSE_CODECS
        for j in originals:
            if similarity[i, j] > COPY_COSINE:
                found[i] = (j, f"cosine {similarity[i, j]:.4f} > {COPY_COSINE}")
                break
            overlap = support_overlap(rows[i], rows[j]) if sparse else 0.0
            if overlap > COPY_SUPPORT_OVERLAP:
                found[i] = (j, f"{overlap:.1%} of the same coordinates > {COPY_SUPPORT_OVERLAP:.0%}")
                break
        else:
            originals.append(i)
    return found
