"""Exact global top-k over many score blocks, in one streaming pass with O(k) extra memory.

SFAS selects the k entries with the largest scores across every trainable tensor of a
model (~10^8 entries). Concatenating the scores and calling ``torch.topk`` holds two
parameter-sized copies and is slow on one thread. :func:`select_top_k` instead asks for
the scores one block at a time — **once per block** — and keeps a small pool of candidates:

1. Each candidate is (score, global position), the position being the block's offset plus
   the flat index, so position order is (block, index) order. The pool is kept in
   position order: blocks are visited in order and filtering preserves order.
2. Until the pool has seen k entries every entry is a candidate. After that the pool is
   cut back to exactly the k best (see 4); their smallest score ``t`` becomes the entry
   bar. A later entry enters only if its score is **strictly** above ``t``: an entry equal
   to ``t`` ties with k earlier entries at least as good and loses the tie-break, so it can
   never be selected. ``t`` only rises, so ever fewer entries enter.
3. A block is filtered with one comparison and one ``nonzero``; a block whose maximum does
   not exceed ``t`` costs one reduction only. The maximum doubles as the NaN check (max
   reductions propagate NaN).
4. When the pool outgrows ``capacity = k + max(k, 65536)`` it is cut back to k: the k-th
   largest score ``t`` (``kthvalue``, linear time), every entry above ``t`` and the first
   ``k - #above`` entries equal to ``t`` in position order. Each cut removes at least
   ``max(k, 65536)`` entries at a cost linear in ``capacity``, so cuts cost O(N) overall
   even when every block beats the bar (blocks in ascending order); with scores of similar
   distribution in every block only O(k log(N/k)) entries ever enter and cuts are rare.

The result is exactly what a stable descending sort of the concatenated scores would give
(ties broken by lower block, then lower flat index). Scores compare as floats: −0 == +0
(they tie and the earlier position wins, as in a sort), −inf is the lowest value, +inf the
highest; NaN is rejected.

Cost: one ``scores(i)`` call per block, plus per block one max reduction, one comparison and
one ``nonzero`` — about 1.7 ns per entry on one CPU thread, well below the cost of generating
the scores. Extra memory: the pool (≤ capacity + one block's entrants, 12 bytes each), a
one-byte mask and the entrants' indices of the current block; only while fewer than k
entries have been seen (and for a block that beats the bar everywhere) does a whole block
enter the pool, a one-block transient. A radix select on the float bit patterns (histogram
of the top 16 bits, then of the low 16 bits, then collection) is also exact and lean but
needs two or three ``scores(i)`` calls per block plus ~4 ns per entry for keys and
histograms — about three times the cost of this single pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

#: Slack above k before the pool is cut back (bounds the number of cuts for small k).
_MIN_SLACK = 1 << 16


def _kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest of ``values`` (1 ≤ k ≤ len, no NaN)."""
    n = values.numel()
    if values.is_cpu:  # numpy's introselect is ~5x faster than torch.kthvalue on CPU
        return float(np.partition(values.numpy(), n - k)[n - k])
    return float(values.kthvalue(n - k + 1).values)


class _Pool:
    """Candidates for the top k, in position order, with the bar a newcomer must beat."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.capacity = k + max(k, _MIN_SLACK)
        self.values: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.count = 0
        #: k-th largest score at the last cut; None (everything enters) before the first cut.
        self.bar: float | None = None
        self.device: torch.device | None = None

    def offer(self, x: torch.Tensor, maximum: float, offset: int) -> None:
        """Add the entries of block ``x`` (at global ``offset``) that can still make the top k."""
        if self.k == 0 or x.numel() == 0 or (self.bar is not None and maximum <= self.bar):
            return
        if self.device is None:
            self.device = x.device
        if self.bar is None:
            # Copies: the caller may reuse the block's storage for the next block.
            values = x.clone()
            positions = torch.arange(offset, offset + x.numel(), device=x.device)
        else:
            index = torch.gt(x, x.new_full((), self.bar)).nonzero().squeeze(1)
            values = x.index_select(0, index)
            positions = index.add_(offset)
        self.values.append(values.to(self.device))
        self.positions.append(positions.to(self.device))
        self.count += values.numel()
        if self.count > self.capacity:
            self.cut()

    def cut(self) -> None:
        """Keep exactly the k best candidates (earliest position wins a tie) and raise the bar."""
        values = torch.cat(self.values)
        positions = torch.cat(self.positions)
        kth = _kth_largest(values, self.k)
        index = (values >= kth).nonzero().squeeze(1)
        surplus = index.numel() - self.k
        if surplus:  # more entries tie with the k-th than fit: drop the last of them
            ties = (values.index_select(0, index) == kth).nonzero().squeeze(1)
            keep = torch.ones_like(index, dtype=torch.bool)
            keep[ties[-surplus:]] = False
            index = index[keep]
        self.values = [values.index_select(0, index)]
        self.positions = [positions.index_select(0, index)]
        self.count = self.k
        self.bar = kth

    def selected(self) -> torch.Tensor:
        """Global positions of the k best entries, ascending."""
        if self.count > self.k:
            self.cut()
        if not self.positions:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat(self.positions)


def select_top_k(scores: Callable[[int], torch.Tensor], sizes: Sequence[int], k: int) -> list[torch.Tensor]:
    """Flat indices of the k largest scores across blocks, one sorted int64 tensor per block.

    ``scores(i)`` must return block i's scores, a 1-D float32 tensor of ``sizes[i]`` entries;
    it is called exactly once per block, in block order, and no block is held after the next
    is requested. Ties are broken by lower block, then lower flat index (a stable descending
    sort of the concatenated scores). Raises ValueError if k is outside [0, sum(sizes)] or a
    block contains NaN.
    """
    sizes = [int(n) for n in sizes]
    if any(n < 0 for n in sizes):
        raise ValueError(f"block sizes must be non-negative, got {sizes}")
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot select {k} of {total} entries")
    pool = _Pool(k)
    offsets: list[int] = []
    devices: list[torch.device] = []
    offset = 0
    for i, n in enumerate(sizes):
        x = scores(i).detach()
        if x.dtype != torch.float32 or tuple(x.shape) != (n,):
            raise ValueError(f"scores({i}) must be a float32 tensor of shape ({n},), "
                             f"got {x.dtype} {tuple(x.shape)}")
        maximum = float(x.amax()) if n else -math.inf
        if math.isnan(maximum):
            raise ValueError(f"scores of block {i} contain NaN")
        pool.offer(x, maximum, offset)
        offsets.append(offset)
        devices.append(x.device)
        offset += n
        del x  # the block must be free before the next one is generated
    positions = pool.selected()
    starts = torch.tensor(offsets + [total], dtype=torch.int64, device=positions.device)
    counts = torch.searchsorted(positions, starts).diff().tolist()
    return [(block - start).to(device)
            for block, start, device in zip(positions.split(counts), offsets, devices)]
