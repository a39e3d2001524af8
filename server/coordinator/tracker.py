"""The coordinator as tracker: which peers each node dials, and which chunks it seeds from the coordinator.

Nodes sit on a ring ordered by a hash of their ids, so the mesh stays the same from round to round while the
membership does (links are kept, not rebuilt). Each node dials the next node on the ring and a few chords to nodes
picked by its id further along, and is dialed by about as many: about `peers` links each, and a mesh only a few
hops across. Each pair has one dialer, so two offers never cross. The seed share
splits every manifest's chunks among the round's nodes (chunk i to the node in slot i % slots): the coordinator
sends each chunk about once, and the nodes trade the rest (shared/swarm.py). `peers` = 0 is the star: no peer
links, and every node fetches everything from the coordinator.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

DEFAULT_PEERS = 4


@dataclass(frozen=True)
class Advice:
    peers: tuple[str, ...]  # node ids to dial
    seed_slot: int
    seed_slots: int


STAR = Advice((), 0, 1)


def _ring(node_ids: list[str]) -> list[str]:
    return sorted(set(node_ids), key=lambda n: (hashlib.sha256(bytes.fromhex(n) if len(n) == 64 else n.encode())
                                                .digest(), n))


def advise(node_ids: list[str], peers: int, rotation: int = 0) -> dict[str, Advice]:
    """Every node's advice for a round among `node_ids`, for about `peers` links per node (0: the star). The seed
    slots turn by `rotation` (the round number) along the ring, so that no node seeds the same chunks every round: a
    one-chunk delta would otherwise come from the coordinator to the same node each time."""
    ring = _ring(node_ids)
    n = len(ring)
    if peers <= 0 or n < 2:
        return {node_id: STAR for node_id in ring}
    reach = -(-peers // 2)  # links each node opens; as many come in from others
    dials: dict[int, list[int]] = {i: [] for i in range(n)}
    pairs: set[tuple[int, int]] = set()

    def dial(i: int, j: int) -> None:
        pair = (min(i, j), max(i, j))
        if i != j and pair not in pairs:  # each pair has one dialer, so two offers never cross
            pairs.add(pair)
            dials[i].append(j)

    if n <= peers + 1:  # few enough for everyone to link to everyone
        for i in range(n):
            for j in range(i + 1, n):
                dial(i, j)
    else:
        for i in range(n):
            dial(i, (i + 1) % n)  # the ring keeps the mesh connected
        for i, node_id in enumerate(ring):
            # chords to nodes far along the ring, picked by the node's id: the mesh is a few hops across at any size
            # (a ring alone would be n/peers hops, and chunks far from their seed would come from the coordinator)
            for c in range(reach - 1):
                digest = hashlib.sha256(f"{node_id}:{c}".encode()).digest()
                dial(i, (i + 2 + int.from_bytes(digest[:8], "big") % (n - 3)) % n)
    return {ring[i]: Advice(tuple(ring[j] for j in dials[i]), (i + rotation) % n, n) for i in range(n)}


def advise_joiner(node_ids: list[str], joiner: str, peers: int, seed_slots: int, rotation: int = 0) -> Advice:
    """The advice of a node that joins while a round is open, among `node_ids` (itself included): the others got
    theirs when the round opened, so it dials every node it would link to itself, those that would have dialed it
    too, and it takes a slot of the round's `seed_slots` (those the others split the chunks into)."""
    advice = advise(node_ids, peers, rotation)
    own = advice[joiner]
    dialing_it = tuple(n for n, a in advice.items() if joiner in a.peers)
    slots = max(1, seed_slots)
    return Advice(own.peers + dialing_it, own.seed_slot % slots, slots)
