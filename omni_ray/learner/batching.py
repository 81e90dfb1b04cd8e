"""How a round's training items become optimizer steps and micro-batches (pure: no torch, no DeepSpeed).

- Global batches: each epoch is a permutation of the round's items seeded by (run seed, round, epoch), cut into
  `learner.batch_size` items; every rank computes the same batches, so ranks agree on the data without talking.
- Rank shares: rank r takes items r, r + W, r + 2W, ... of a global batch.
- Micro-batches: a share is sorted by length and cut into `learner.micro_batch_size` items, or into pieces of at
  most `learner.max_tokens_per_micro_batch` padded tokens, so pairs of similar length share the padding. Every rank
  gets the *same number* of micro-batches: each forward and backward is a collective under ZeRO-3 (and gradient
  reduction per backward under ZeRO-2), so a rank with fewer splits its largest piece further, and a rank that has
  run out of items to split runs an empty piece (a forward on one item whose loss is multiplied by 0).

Every rank knows every rank's share (the round is broadcast whole), so the equal count is computed, not agreed on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def global_batches(
    n_items: int, batch_size: int, epochs: int, seed: tuple[int, ...], world_size: int
) -> list[list[int]]:
    """Item indices per optimizer step for all epochs. A remainder smaller than the world size joins the previous
    batch, so no rank gets an empty share, unless the round has fewer items than ranks (those ranks then run a
    dummy piece, `micro_batches`' filler)."""
    out: list[list[int]] = []
    for epoch in range(epochs):
        order = np.random.default_rng([*seed, epoch]).permutation(n_items)
        chunks = [order[i : i + batch_size].tolist() for i in range(0, n_items, batch_size)]
        if len(chunks) > 1 and len(chunks[-1]) < world_size:
            chunks[-2] += chunks.pop()
        out += chunks
    return out


@dataclass(frozen=True)
class MicroBatch:
    """Item indices of one forward/backward. `dummy`: the rank has nothing left to run here; it runs `items` (one
    item) for the collectives' sake and scales its loss by 0."""

    items: tuple[int, ...]
    dummy: bool = False


def _pieces(share: Sequence[int], cost: Callable[[Sequence[int]], int], size: int, max_tokens: int) -> list[list[int]]:
    if not share:
        return []
    ordered = sorted(share, key=lambda i: cost([i]), reverse=True)
    if max_tokens <= 0:
        step = size if size > 0 else len(ordered)
        return [ordered[i : i + step] for i in range(0, len(ordered), step)]
    pieces: list[list[int]] = [[]]
    for i in ordered:
        if pieces[-1] and (cost([*pieces[-1], i]) > max_tokens or 0 < size <= len(pieces[-1])):
            pieces.append([])
        pieces[-1].append(i)
    return pieces


def micro_batches(
    shares: Sequence[Sequence[int]],
    cost: Callable[[Sequence[int]], int],
    *,
    size: int = 0,
    max_tokens: int = 0,
    filler: int = 0,
) -> list[list[MicroBatch]]:
    """Per rank, its share as micro-batches; all ranks get the same count.

    cost(items) is the padded token count of a micro-batch of those items. size: items per micro-batch (0: the
    whole share); max_tokens: a token budget per micro-batch instead (a single item over it still runs alone).
    filler: the item a dummy piece runs when a rank's share is empty.
    """
    per_rank = [_pieces(s, cost, size, max_tokens) for s in shares]
    count = max(len(p) for p in per_rank)
    out = []
    for share, pieces in zip(shares, per_rank):
        while len(pieces) < count and any(len(p) > 1 for p in pieces):
            big = max(range(len(pieces)), key=lambda k: (len(pieces[k]), -k))
            half = len(pieces[big]) // 2
            pieces[big : big + 1] = [pieces[big][:half], pieces[big][half:]]
        mbs = [MicroBatch(tuple(p)) for p in pieces]
        dummy = MicroBatch((share[0] if share else filler,), dummy=True)
        out.append(mbs + [dummy] * (count - len(mbs)))
    return out
