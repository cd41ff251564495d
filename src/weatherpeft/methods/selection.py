"""Exact global top-k over many score blocks, in one streaming pass with O(k) extra memory.

SFAS selects the k entries with the largest scores across every trainable tensor of a
model (~10^8 entries). Concatenating the scores and calling ``torch.topk`` holds the scores
plus, on CPU, a 16-byte-per-entry work queue, and is slow on one thread. :func:`select_top_k`
asks for the scores one block at a time — **once per block** — and keeps a pool of
candidates:

1. A candidate is (score, global position), the position being the block's offset plus the
   flat index, so position order is (block, index) order. The pool stays in position order:
   blocks are visited in order and every filter below preserves order.
2. When the pool outgrows ``capacity = k + max(k, 65536)`` it is *cut* back to exactly the
   k best: ``t`` = the k-th largest score (linear-time selection), every candidate ≥ ``t``,
   and if more than k tie at ``t``, the first ones in position order. ``t`` becomes the
   *bar*: a later entry enters the pool only if its score is **strictly** above it — an
   entry equal to ``t`` ties with k earlier candidates at least as good and loses the
   tie-break, so it can never be selected. Before the first cut every entry enters. The
   bar only rises, so ever fewer entries enter.
3. A block is filtered with one comparison and one ``nonzero``; a block whose maximum does
   not exceed the bar costs one reduction only. The maximum doubles as the NaN check (max
   reductions propagate NaN). A final cut leaves exactly k.

The result is what a stable descending sort of the concatenated scores gives (ties broken
by lower block, then lower flat index). Scores compare as floats: −0 == +0 (they tie and
the earlier position wins, as in a sort), −inf is the lowest value, +inf the highest; NaN is
rejected.

Cost, on one CPU thread: per entry one max, one comparison and one ``nonzero``, ~1.7 ns
(generating SFAS scores costs ~5 ns); per pool entry at a cut ~15 ns (numpy's introselect
on CPU, ``kthvalue`` elsewhere). Each cut removes ≥ max(k, 65536) candidates at a cost
linear in ``capacity``, so cuts cost O(N) even in the worst case (every block beats the bar,
e.g. blocks in ascending order). With similarly distributed blocks ~k·(1 + ln(N/k))
entries ever enter: negligible for k ≤ 1 % of N, dominant for k ≳ 10 % of N (still faster
than concatenate + ``topk`` there). Extra memory: the pool, ≤ capacity plus one block's
entrants at 12 bytes each, and the current block's one-byte mask and entrant indices; a
whole block enters (a one-block transient) only before the first cut or where it beats the
bar everywhere.

:func:`select_top_k_scored` also returns the selected scores: under FSDP each rank selects
its shard's top k with it and :func:`weatherpeft.distributed.sharded_top_k` merges the
ranks' (score, position) candidates into the exact global top k.

A radix select on the float bit patterns (histogram of the top 16 key bits, then of the low
16 in the boundary bin, then collection) is exact and lean too, but needs two or three
``scores(i)`` calls per block plus ~4 ns per entry for keys and histograms: more than
twice this pass's time for the small k SFAS uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

#: Slack above k before the pool is cut back (bounds the number of cuts for small k).
_MIN_SLACK = 1 << 16
#: Entries per chunk of the prefilter: only chunks whose maximum beats the bar are compared.
_CHUNK = 64


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

    def offer(self, x: torch.Tensor, maximum: float, offset: int,
              chunk_maxima: torch.Tensor | None = None) -> None:
        """Add the entries of block ``x`` (at global ``offset``) that can still make the top k.

        ``chunk_maxima``: maxima of x's consecutive ``_CHUNK``-entry chunks (the whole ones):
        entries of chunks that cannot beat the bar are skipped without being compared.
        """
        if self.k == 0 or x.numel() == 0 or (self.bar is not None and maximum <= self.bar):
            return
        if self.device is None:
            self.device = x.device
        if self.bar is None:
            # Copies: the caller may reuse the block's storage for the next block.
            values = x.clone()
            positions = torch.arange(offset, offset + x.numel(), device=x.device)
        else:
            bar = x.new_full((), self.bar)
            if chunk_maxima is None:
                index = torch.gt(x, bar).nonzero().squeeze(1)
            else:
                hot = torch.gt(chunk_maxima, bar).nonzero().squeeze(1)
                whole = chunk_maxima.numel() * _CHUNK
                candidates = torch.cat([
                    (hot.unsqueeze(1) * _CHUNK + torch.arange(_CHUNK, device=x.device)).reshape(-1),
                    torch.arange(whole, x.numel(), device=x.device)])
                index = candidates[torch.gt(x.index_select(0, candidates), bar)]
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

    def selected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global positions of the k best entries, ascending, and their scores."""
        if self.count > self.k:
            self.cut()
        if not self.positions:
            return torch.empty(0, dtype=torch.int64), torch.empty(0)
        return torch.cat(self.positions), torch.cat(self.values)


def select_top_k(scores: Callable[[int], torch.Tensor], sizes: Sequence[int], k: int) -> list[torch.Tensor]:
    """Flat indices of the k largest scores across blocks, one sorted int64 tensor per block.

    ``scores(i)`` must return block i's scores, a 1-D float32 tensor of ``sizes[i]`` entries;
    it is called exactly once per block, in block order, and no block is held after the next
    is requested. Ties are broken by lower block, then lower flat index (a stable descending
    sort of the concatenated scores). Raises ValueError if k is outside [0, sum(sizes)] or a
    block contains NaN.
    """
    return select_top_k_scored(scores, sizes, k)[0]


def select_top_k_scored(scores: Callable[[int], torch.Tensor], sizes: Sequence[int],
                        k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`select_top_k` plus the selected entries' scores (one float32 tensor per block,
    aligned with the indices): what a merge of several ranks' candidates needs."""
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
        chunk_maxima = None
        if n >= 16 * _CHUNK:
            x = x.contiguous()
            whole = n // _CHUNK * _CHUNK
            chunk_maxima = x[:whole].view(-1, _CHUNK).amax(1)
            maximum = float(torch.cat([chunk_maxima, x[whole:]]).amax())  # NaN propagates
        else:
            maximum = float(x.amax()) if n else -math.inf
        if math.isnan(maximum):
            raise ValueError(f"scores of block {i} contain NaN")
        pool.offer(x, maximum, offset, chunk_maxima)
        offsets.append(offset)
        devices.append(x.device)
        offset += n
        del x  # the block must be free before the next one is generated
    positions, values = pool.selected()
    starts = torch.tensor(offsets + [total], dtype=torch.int64, device=positions.device)
    counts = torch.searchsorted(positions, starts).diff().tolist()
    indices = [(block - start).to(device)
               for block, start, device in zip(positions.split(counts), offsets, devices)]
    return indices, [block.to(device) for block, device in zip(values.split(counts), devices)]
