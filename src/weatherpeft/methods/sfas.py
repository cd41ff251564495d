"""Stochastic Fisher-guided Adaptive Selection (SFAS): train a refreshed top-k of the weights.

Every ``refresh_every`` steps (R; R = 1 is the paper's setting):

1. Fisher: F = Σ g² of the task loss over the steps since the last refresh (the diagonal
   empirical Fisher, up to a constant; with R = 1, this step's squared gradient).
2. Scores: F̃ = F/max(F)·(1 + γ·(1 − n/t)·U(0, 1)) (``noise="multiplicative"``, the
   default), or F / max(F) + γ·(1 − n/t)·U (``"additive"``, the other reading of the
   paper), with n/t = (step + 1) / total steps: early refreshes explore, the last one is
   pure Fisher. ``"authors"``: the authors' code, |g|·U(0, 1) at every refresh (√F when
   R > 1), not annealed — their annealing scalar multiplies every score alike, so it cannot
   change the ranking. The benchmark chose the default (docs/results/investigation): F/max F is
   heavy-tailed, so additive noise of γ = 0.2 outweighs the Fisher of almost every entry and
   early selections are close to random — in union mode the moved set then grows to nearly
   every weight (92 % of aurora-tiny in 120 steps at a 4 % budget), for worse RMSE than the
   multiplicative form, which perturbs the ranking only among entries of similar Fisher.
3. Selection: the global top-k of F̃ over every selectable entry, found with
   :func:`~weatherpeft.methods.selection.select_top_k` in a few O(N) passes (no sort of all
   entries, no concatenated copy); the noise is regenerated per block from seeded
   generators instead of being stored — one per chunk of ``_NOISE_CHUNK`` entries of a
   tensor, seeded by (seed, step, tensor, chunk), so an entry's noise depends on its
   position in the full tensor only, not on how it is sharded. With multiplicative noise a
   score lies in [F, (1 + γ_n)·F], so most entries cannot make the top k: one pass over F
   keeps the candidates, noise is drawn only for the chunks that hold one, and the top k of
   the candidates is the same selection, entry for entry (:meth:`FisherSelection._pruned_top_k`).
4. Update: :class:`~weatherpeft.methods.masked_update.MaskedUpdate` — only selected entries
   move, with no weight decay or momentum anywhere else.

Distributed. Under DDP every rank sees the all-reduced gradients and the same seeded noise, so
every rank selects the same mask (``WEATHERPEFT_CHECK_MASKS=1`` checks it, see
:mod:`~weatherpeft.methods.masked_update`). Under FSDP each rank scores only its shard of
every tensor, max F is all-reduced, and :func:`~weatherpeft.distributed.sharded_top_k` merges
the ranks' local top-k candidates into the exact global top k (same ties as unsharded);
selection, moments and the moved set stay per shard.

``budget_mode="union"`` (the paper): each refresh selects k entries anywhere; the entries
that ever moved (the adapter file's content) can exceed k and are reported. ``"strict"``:
the union is capped at the SFAS budget; each refresh selects ``step_fraction`` of it, new
entries only while the cap has room, then within the union — the exact best selection
under the cap (top-c outside the union plus top-(k−c) inside, c = room left).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from weatherpeft import distributed
from weatherpeft.backbones.base import Backbone
from weatherpeft.distributed import local_tensor
from weatherpeft.methods.base import Adaptation, budget_entries, match_names, register_method
from weatherpeft.methods.masked_update import MaskedUpdate
from weatherpeft.methods.selection import _kth_largest, select_top_k

__all__ = ["FisherSelection", "NOISE_FORMS", "NoiseForm", "SFASConfig", "apply_sfas", "block_noise",
           "noise_at", "selectable_parameters"]

#: Levels of the 16-bit uniform noise (U(0, 1) to within 2⁻¹⁷).
_NOISE_LEVELS = float(1 << 16)


class NoiseForm:
    """How annealed noise enters the SFAS score. ``scores`` must be elementwise (an entry's
    score depends on its own value and noise only), so that scoring a subset of the entries
    gives the same numbers as scoring all of them."""

    #: Whether the scores depend on max F (``peak``, through ``weight``).
    needs_peak = False
    #: Whether the noise fades with the steps (then a noise scale of 0 scores F alone).
    annealed = True

    def scores(self, values: torch.Tensor, noise: torch.Tensor, squared: bool, scale: float,
               weight: float) -> torch.Tensor:
        """Scores from ``values`` (g if ``squared``, else F) and the noise as floats of the
        16-bit integers r ∈ [−2¹⁵, 2¹⁵) (U = (r + 2¹⁵ + ½)/2¹⁶); may write into ``noise``.
        ``scale`` = γ_n > 0; ``weight`` = 2¹⁶ / (γ_n · max F) (0 if max F is 0)."""
        raise NotImplementedError

    def fisher_floor(self, scale: float, weight: float) -> Callable[[float], float] | None:
        """``floor(L)``: an F below which an entry scores below every entry with F ≥ L,
        whatever the noise of either; None where the form has no such bound (then every
        entry is scored)."""
        return None


class MultiplicativeNoise(NoiseForm):
    """F·(1 + γ_n·U); 1/max F changes no ranking and is left out."""

    #: Relative rounding slack of the score bound (float32 rounding is ~8 × 2⁻²⁴ at most).
    _SLACK = 1e-5
    #: Absolute slack for subnormal F (float32's smallest normal is 1.2e-38).
    _TINY = 1e-37

    def scores(self, values: torch.Tensor, noise: torch.Tensor, squared: bool, scale: float,
               weight: float) -> torch.Tensor:
        factor = noise.add_(_NOISE_LEVELS / 2 + 0.5).mul_(scale / _NOISE_LEVELS).add_(1.0)
        return factor.mul_(values).mul_(values) if squared else factor.mul_(values)

    def fisher_floor(self, scale: float, weight: float) -> Callable[[float], float]:
        """The factor is ≥ 1 after rounding, so a score is ≥ its F; it is ≤ (1 + γ_n)·F up to
        float32 rounding: F < L / ((1 + γ_n)(1 + slack)) − tiny scores below L."""
        return lambda bound: bound / ((1.0 + scale) * (1.0 + self._SLACK)) - self._TINY


class AdditiveNoise(NoiseForm):
    """r + κ·F (see FisherSelection.refresh). The score is within γ_n·max F of F/max F·…, a
    bound that prunes nothing until γ_n falls below F_(k)/max F, and ``addcmul``'s
    vectorised and scalar code paths may round differently (FMA contraction), so entries
    scored apart need not match entries scored in a block: no bound, every entry is scored."""

    needs_peak = True

    def scores(self, values: torch.Tensor, noise: torch.Tensor, squared: bool, scale: float,
               weight: float) -> torch.Tensor:
        if squared:
            return noise.addcmul_(values, values, value=weight)
        return noise.add_(values, alpha=weight)


class AuthorsNoise(NoiseForm):
    """The authors' code: |g|·U (√F·U when F accumulates over several steps), never annealed
    (their scalar weight cannot change the ranking). U reaches ½/2¹⁶, so no F bounds the
    score usefully: every entry is scored."""

    annealed = False

    def scores(self, values: torch.Tensor, noise: torch.Tensor, squared: bool, scale: float,
               weight: float) -> torch.Tensor:
        magnitude = values.abs() if squared else values.sqrt()
        return noise.add_(_NOISE_LEVELS / 2 + 0.5).mul_(magnitude)


#: SFASConfig.noise → its form.
NOISE_FORMS: dict[str, NoiseForm] = {"multiplicative": MultiplicativeNoise(),
                                     "additive": AdditiveNoise(), "authors": AuthorsNoise()}

BUDGET_MODES = ("union", "strict")


@dataclass
class SFASConfig:
    """SFAS options. ``gamma``: initial noise coefficient γ; ``refresh_every``: R steps;
    ``noise``: multiplicative | additive | authors; ``budget_mode``: union | strict (see module doc);
    ``step_fraction``: per-refresh k as a fraction of the SFAS entries (default 1 in union
    mode, 0.5 in strict mode, where 1 would freeze the first selection); ``include`` /
    ``exclude``: regexes on pretrained parameter names (default: every pretrained entry,
    encoder and decoder included); ``seed``: of the noise."""

    gamma: float = 0.2
    refresh_every: int = 1
    noise: str = "multiplicative"
    budget_mode: str = "union"
    step_fraction: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"SFAS gamma must not be negative, got {self.gamma}")
        if self.refresh_every < 1:
            raise ValueError(f"SFAS refresh_every must be at least 1, got {self.refresh_every}")
        if self.noise not in NOISE_FORMS:
            raise ValueError(f"SFAS noise must be one of {tuple(NOISE_FORMS)}, got {self.noise!r}")
        if self.budget_mode not in BUDGET_MODES:
            raise ValueError(f"SFAS budget_mode must be one of {BUDGET_MODES}, got {self.budget_mode!r}")
        if self.step_fraction is None:
            self.step_fraction = 1.0 if self.budget_mode == "union" else 0.5
        if not 0.0 < self.step_fraction <= 1.0:
            raise ValueError(f"SFAS step_fraction must be in (0, 1], got {self.step_fraction}")
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)


#: Entries per noise chunk (a multiple of 4): each chunk of a tensor has its own generator.
_NOISE_CHUNK = 1 << 18
_MASK64 = (1 << 64) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_SIGN_BIT = torch.tensor(_INT64_MIN)
#: Entries of F sampled per rank to estimate the k-th largest before a pruned selection.
_FISHER_SAMPLE = 1 << 16
#: Blocks below this many entries are scanned together, in groups of up to _GROUP_ENTRIES.
_SMALL_BLOCK = 1 << 18
_GROUP_ENTRIES = 1 << 21


def _seed(*entropy: int) -> int:
    """A 63-bit seed from integers via numpy's SeedSequence (well mixed)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)


def _mix(value: int) -> int:
    """splitmix64's finaliser: a cheap, well-mixed 63-bit seed per chunk from base + chunk."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def block_noise(base_seed: int, numel: int, start: int, count: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform int16 noise of entries [start, start + count) of a tensor of ``numel`` entries.

    Chunk c (entries [c·C, (c+1)·C), C = ``_NOISE_CHUNK``) is always drawn whole from a
    generator seeded by (base_seed, c), so an entry's value depends on (base_seed, position)
    only: any shard of a tensor gets exactly the unsharded tensor's noise at its positions.
    """
    device = torch.device(device)
    if count <= 0:
        return torch.empty(0, dtype=torch.int16, device=device)
    if start < 0 or start + count > numel:
        raise ValueError(f"noise range [{start}, {start + count}) outside a tensor of {numel} entries")
    first, last = start // _NOISE_CHUNK, (start + count - 1) // _NOISE_CHUNK
    chunks = range(first, last + 1)
    words_per_chunk = [(min(_NOISE_CHUNK, numel - c * _NOISE_CHUNK) + 3) // 4 for c in chunks]
    words = torch.empty(sum(words_per_chunk), dtype=torch.int64, device=device)
    at = 0
    for chunk, n in zip(chunks, words_per_chunk):
        generator = torch.Generator(device=device).manual_seed(_mix(base_seed + chunk))
        torch.randint(-(1 << 63), (1 << 63) - 1, (n,), dtype=torch.int64, generator=generator,
                      device=device, out=words[at:at + n])
        at += n
    skip = start - first * _NOISE_CHUNK
    return words.view(torch.int16)[skip:skip + count]


def noise_at(base_seed: int, numel: int, positions: torch.Tensor) -> torch.Tensor:
    """``block_noise(base_seed, numel, 0, numel)[positions]`` (``positions``: sorted flat
    indices into the full tensor), drawing only the chunks that hold some of them."""
    return _noise_from_words(*_noise_words(base_seed, numel, positions))


def _noise_words(base_seed: int, numel: int, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The 64-bit words holding the noise at sorted ``positions`` and each position's place
    in its chunk (for :func:`_noise_from_words`), drawing only the chunks that hold them.

    On CPU the words come from ``random_`` over the full 64-bit range, which returns the
    engine's random64() as is; ``block_noise``'s randint over [−2⁶³, 2⁶³ − 1) returns
    random64() mod (2⁶⁴ − 1) − 2⁶³ from the same draws — the same word with its sign bit
    flipped (and 2⁶⁴ − 1 → −2⁶³), which :func:`_noise_from_words` applies. Cheaper (no
    64-bit modulo per word), same noise. Elsewhere the words are randint's own.
    """
    device = positions.device
    empty = torch.empty(0, dtype=torch.int64, device=device)
    if not positions.numel():
        return empty, empty
    if numel <= _NOISE_CHUNK:  # one chunk
        chunks, counts = [0], [positions.numel()]
    else:
        chunks, counts = torch.unique_consecutive(
            torch.div(positions, _NOISE_CHUNK, rounding_mode="floor"), return_counts=True)
        chunks, counts = chunks.tolist(), counts.tolist()
    words, places, at = [], [], 0
    for chunk, count in zip(chunks, counts):
        within = positions[at:at + count] - chunk * _NOISE_CHUNK
        at += count
        n = (min(_NOISE_CHUNK, numel - chunk * _NOISE_CHUNK) + 3) // 4
        generator = torch.Generator(device=device).manual_seed(_mix(base_seed + chunk))
        if device.type == "cpu":
            drawn = torch.empty(n, dtype=torch.int64).random_(_INT64_MIN, None, generator=generator)
        else:
            drawn = torch.randint(_INT64_MIN, _INT64_MAX, (n,), dtype=torch.int64,
                                  generator=generator, device=device)
        words.append(drawn[within >> 2])
        places.append(within)
    if len(words) == 1:
        return words[0], places[0]
    return torch.cat(words), torch.cat(places)


def _noise_from_words(words: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """int16 noise from :func:`_noise_words`' output: entry j of a chunk is int16 number j of
    its words (little-endian), as in ``block_noise``."""
    if words.device.type == "cpu":  # random_'s words → randint's (see _noise_words)
        words = words ^ _SIGN_BIT
        words[words == _INT64_MAX] = _INT64_MIN
    halves = (words >> ((places & 3) * 16)) & 0xFFFF
    return (halves - ((halves & 0x8000) << 1)).to(torch.int16)


def _not_below(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Flat indices of the entries of 1-D ``values`` that are not below ``threshold`` (NaN
    included). On CPU through numpy: ~1 ns per entry against ~12 for torch's comparison with a
    Python scalar and ``nonzero`` on one thread."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(~(values.numpy() < np.float32(threshold))))
    return torch.lt(values, threshold).logical_not_().nonzero().squeeze(1)


def _block_groups(sizes: list[int]) -> list[list[int]]:
    """Consecutive block indices in groups for one pass each: a block of ``_SMALL_BLOCK``
    entries or more alone, smaller ones together up to ``_GROUP_ENTRIES`` entries (one
    operation on a concatenation instead of one per small tensor)."""
    groups: list[list[int]] = []
    filled = math.inf  # entries in the last group, inf when it takes no more
    for i, size in enumerate(sizes):
        if size >= _SMALL_BLOCK:
            groups.append([i])
            filled = math.inf
        elif filled + size > _GROUP_ENTRIES:
            groups.append([i])
            filled = size
        else:
            groups[-1].append(i)
            filled += size
    return groups


class FisherSelection(MaskedUpdate):
    """The SFAS trainer hook: Fisher accumulation, annealed noise, global top-k, masked update.

    ``entries``: the SFAS budget in entries — k per refresh in union mode, the cap on the
    union in strict mode (k = step_fraction × entries per refresh). Works on FSDP shards
    (see the module doc).
    """

    supports_sharding = True

    def __init__(self, parameters: Mapping[str, torch.nn.Parameter], entries: int,
                 config: SFASConfig) -> None:
        self.config = config
        self.cap = int(entries) if config.budget_mode == "strict" else None
        super().__init__(parameters, max(1, round(entries * config.step_fraction)))
        self.total_steps: int | None = None
        self._fisher: dict[str, torch.Tensor] = {}
        self._since_refresh = 0

    # -- Fisher ---------------------------------------------------------------------------

    def _gradient(self, name: str) -> torch.Tensor | None:
        grad = self.parameters[name].grad
        return grad if grad is None or not self.sharded else local_tensor(grad)

    def _accumulate(self) -> None:
        for name in self.parameters:
            grad = self._gradient(name)
            if grad is None:
                continue
            if name not in self._fisher:
                self._fisher[name] = torch.zeros_like(grad, dtype=torch.float32)
            self._fisher[name].addcmul_(grad, grad)
        self._since_refresh += 1

    def _global_max(self, value: float) -> float:
        return float(distributed.all_reduce([value], "max")[0]) if self.sharded else value

    def _global_min(self, value: float) -> float:
        return float(distributed.all_reduce([value], "min")[0]) if self.sharded else value

    def _global_sum(self, value: int) -> int:
        return int(distributed.all_reduce([float(value)], "sum")[0]) if self.sharded else value

    def noise_scale(self, step: int) -> float:
        """γ·(1 − n/t) with n/t = (step + 1)/total: zero at the last step."""
        if self.total_steps is None:
            raise RuntimeError("SFAS needs the total number of steps (set by on_fit_start)")
        return self.config.gamma * max(0.0, 1.0 - (step + 1) / self.total_steps)

    # -- selection ------------------------------------------------------------------------

    def refresh(self, source: Callable[[str], torch.Tensor | None], squared: bool, peak: float,
                step: int) -> None:
        """Select at ``step``. ``source(name)`` gives the gradient (``squared=True``: F = g²)
        or the accumulated Fisher F of one tensor (None: no gradient, F = 0), so only one
        block's scores exist at a time; ``peak`` is max F over every tensor (read only by
        noise forms whose ranking depends on it).

        Additive scores are computed as r + κ·F with r the noise as a uniform 16-bit integer
        and κ = 2¹⁶ / (γ_n · max F): an affine, increasing map of F/max F + γ_n·U, so the
        ranking is the same, at one fused pass over the entries. Where the noise form bounds
        the score by F (multiplicative), the selection is first tried on the entries that can
        still make the top k (:meth:`_pruned_top_k`): the same result at a fraction of the cost.
        """
        names = list(self.parameters)
        sharded = self.sharded
        shards = [local_tensor(p) if sharded else p for p in self.parameters.values()]
        sizes = [t.numel() for t in shards]
        full_sizes = [self.parameters[n].numel() for n in names]
        starts = [distributed.shard_offset(self.parameters[n]) if sharded else 0 for n in names]
        scale = self.noise_scale(step)
        form = NOISE_FORMS[self.config.noise]
        weight = 0.0 if peak <= 0 else (_NOISE_LEVELS / (scale * peak) if scale > 0 else 1.0)

        raw: dict[int, torch.Tensor | None] = {}

        def values_of(i: int) -> torch.Tensor:
            if i not in raw:
                values = source(names[i])
                raw[i] = None if values is None else values.detach().reshape(-1)
            values = raw[i]
            return torch.zeros(sizes[i], device=shards[i].device) if values is None \
                else values.float()

        def block_seed(i: int) -> int:
            return _seed(self.config.seed, step, i, 0)

        def scores(i: int, subset: torch.Tensor | None = None) -> torch.Tensor:
            values = values_of(i)
            if subset is not None:
                values = values[subset]
            if scale == 0 and form.annealed:
                return values.square() if squared else values.clone()
            noise = block_noise(block_seed(i), full_sizes[i], starts[i], sizes[i], shards[i].device)
            noise = (noise if subset is None else noise[subset]).float()
            return form.scores(values, noise, squared, scale, weight)

        def candidate_scores(blocks: list[int], candidates: list[torch.Tensor]) -> torch.Tensor:
            """``scores(i)[candidates_i]`` for the ``blocks`` i, concatenated, drawing only the
            noise chunks that hold candidates."""
            kept = [(i, c) for i, c in zip(blocks, candidates) if c.numel()]
            if not kept:
                return torch.empty(0, device=candidates[0].device if candidates else "cpu")
            values = torch.cat([values_of(i)[c] for i, c in kept])
            if scale == 0:
                return values.square() if squared else values.clone()
            drawn = [_noise_words(block_seed(i), full_sizes[i], c + starts[i]) for i, c in kept]
            noise = _noise_from_words(torch.cat([w for w, _ in drawn]),
                                      torch.cat([p for _, p in drawn])).float()
            return form.scores(values, noise, squared, scale, weight)

        if sharded:
            offsets = np.cumsum([0] + full_sizes[:-1]).tolist()
            positions = [int(offset) + start for offset, start in zip(offsets, starts)]

            def top_k(block_scores: Callable, block_sizes: list[int], k: int,
                      subsets: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
                return distributed.sharded_top_k(block_scores, block_sizes, positions, k, subsets)
        else:
            def top_k(block_scores: Callable, block_sizes: list[int], k: int,
                      subsets: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
                chosen = select_top_k(block_scores, block_sizes, k)
                return chosen if subsets is None else [s[c] for s, c in zip(subsets, chosen)]

        def best(k: int) -> list[torch.Tensor]:
            """The top k of every selectable entry."""
            floor = form.fisher_floor(scale, weight)
            chosen = None if floor is None else self._pruned_top_k(
                values_of, squared, sizes, k, floor, candidate_scores, top_k, step)
            return top_k(scores, sizes, k) if chosen is None else chosen

        k = self.per_step_entries
        chosen = best(k) if self.cap is None else \
            self._strict_selection(best, scores, names, sizes, k, top_k)
        self.set_selection(dict(zip(names, chosen)))

    def _pruned_top_k(self, values_of: Callable[[int], torch.Tensor], squared: bool,
                      sizes: list[int], k: int, floor: Callable[[float], float],
                      candidate_scores: Callable[[list[int], list[torch.Tensor]], torch.Tensor],
                      top_k: Callable, step: int) -> list[torch.Tensor] | None:
        """The exact top k, scoring only entries that can make it; None where the pruning
        does not apply (then the caller scores every entry).

        1. L, a value that at least k entries' F reach, estimated from a random sample of F
           (a high quantile of it, so that the check in 3 rarely fails);
        2. one pass over F keeps the candidates, F ≥ ``floor(L)``: every other entry scores
           below every entry with F ≥ L (the noise form's bound), so below k entries;
        3. the check: at least k candidates have F ≥ L (else None);
        4. noise and scores for the candidates only, and their exact top k — ties broken by
           position as in the full selection, so the result is the same, entry for entry.
        NaN Fisher values are candidates, so that the selection rejects them as usual.
        """
        groups = _block_groups(sizes)
        flats = [values_of(group[0]) if len(group) == 1 else torch.cat([values_of(i) for i in group])
                 for group in groups]
        total = self._global_sum(sum(sizes))
        bound = self._sampled_fisher_bound(flats, squared, k, total, step)
        if bound is None:
            return None
        threshold = floor(bound)
        if not threshold > 0:
            return None
        candidates, reached = [], []
        for group, flat in zip(groups, flats):
            fisher = flat * flat if squared else flat  # not written to: may be the gradient
            index = _not_below(fisher, threshold)
            reached.append(fisher[index].cpu())
            if len(group) == 1:
                candidates.append(index)
                continue
            offsets = np.cumsum([0] + [sizes[i] for i in group]).tolist()
            edges = torch.searchsorted(index, torch.tensor(offsets, device=index.device)).tolist()
            candidates += [index[lo:hi] - offset
                           for lo, hi, offset in zip(edges[:-1], edges[1:], offsets)]
        del flats, fisher
        reaching = int(torch.ge(torch.cat(reached), bound).sum())
        if self._global_sum(reaching) < k:
            return None
        counts = [c.numel() for c in candidates]
        if self.sharded:
            return top_k(lambda i: candidate_scores([i], [candidates[i]]), counts, k, candidates)
        # One block of every candidate, in (block, index) order: ties break as before.
        scores = candidate_scores(list(range(len(candidates))), candidates).cpu()
        (chosen,) = select_top_k(lambda _: scores, [scores.numel()], k)
        edges = torch.searchsorted(chosen, torch.tensor(np.cumsum([0] + counts))).tolist()
        return [c[(chosen[lo:hi] - start).to(c.device)] for c, lo, hi, start
                in zip(candidates, edges[:-1], edges[1:], np.cumsum([0] + counts).tolist())]

    def _sampled_fisher_bound(self, flats: list[torch.Tensor], squared: bool, k: int,
                              total: int, step: int) -> float | None:
        """A value of F that likely ≥ k entries reach (over every rank): the ⌈qm + 4√(qm) + 4⌉-th
        largest of m ≈ ``_FISHER_SAMPLE`` entries per rank, sampled in proportion to the sizes of
        ``flats`` (this rank's values, g or F, in groups of blocks), q = k / total (min over
        ranks); None where the sample is too small to tell."""
        local = sum(flat.numel() for flat in flats)
        bound = -math.inf
        count = min(_FISHER_SAMPLE, local)
        if count:
            generator = torch.Generator().manual_seed(_mix(self.config.seed + step))
            sample = []
            for flat in flats:
                share = round(count * flat.numel() / local)
                if share:
                    picked = flat[torch.randint(flat.numel(), (share,), generator=generator)
                                  .to(flat.device)]
                    sample.append((picked * picked if squared else picked).cpu())
            sample = torch.cat(sample)
            expected = k / max(total, 1) * sample.numel()
            rank = math.ceil(expected + 4 * math.sqrt(expected) + 4)
            if rank <= sample.numel():
                bound = _kth_largest(sample, rank)
        bound = self._global_min(bound)
        return None if math.isnan(bound) or bound == -math.inf else bound

    def _strict_selection(self, best: Callable[[int], list[torch.Tensor]], scores: Callable,
                          names: list[str], sizes: list[int], k: int,
                          top_k: Callable) -> list[torch.Tensor]:
        """Best k under the cap: top-c outside the union plus top-(k − c) inside it.
        ``best(k)``: the unconstrained top k; ``top_k(block_scores, sizes, k)``: that of
        other scores."""
        room = self.cap - self._global_sum(self.stored_entries())
        if room >= k:
            return best(k)
        moved = [self.moved_mask(n) for n in names]
        minus_inf = float("-inf")
        if room > 0:
            unconstrained = best(k)
            outside = self._global_sum(sum(int((~mask[idx]).sum())
                                           for mask, idx in zip(moved, unconstrained)))
            if outside <= room:
                return unconstrained
            new = top_k(lambda i: scores(i).masked_fill_(moved[i], minus_inf), sizes, room)
            old = top_k(lambda i: scores(i).masked_fill_(~moved[i], minus_inf), sizes, k - room)
            return [torch.cat([a, b]) for a, b in zip(new, old)]
        if self.sharded:  # saturated, on shards: positions must stay those of whole shards
            return top_k(lambda i: scores(i).masked_fill_(~moved[i], minus_inf), sizes, k)
        # Saturated: only the union can be chosen; score just its entries.
        inside = [torch.nonzero(mask).reshape(-1) for mask in moved]
        chosen = select_top_k(lambda i: scores(i, inside[i]), [len(x) for x in inside], k)
        return [within[picked] for within, picked in zip(inside, chosen)]

    def update_selection(self, trainer: Any, step: int) -> None:
        refresh_now = step % self.config.refresh_every == 0 or not self.selection
        needs_peak = NOISE_FORMS[self.config.noise].needs_peak
        if self.config.refresh_every == 1:
            if refresh_now:
                peak = 0.0
                if needs_peak:
                    grads = [self._gradient(name) for name in self.parameters]
                    extremes = [torch.aminmax(g.detach()) for g in grads if g is not None and g.numel()]
                    peak = max((max(-float(low), float(high)) ** 2 for low, high in extremes),
                               default=0.0)
                    peak = self._global_max(peak)
                self.refresh(self._gradient, True, peak, step)
            return
        self._accumulate()
        if refresh_now:
            peak = 0.0
            if needs_peak:
                peak = max((float(f.max()) for f in self._fisher.values() if f.numel()), default=0.0)
                peak = self._global_max(peak)
            self.refresh(self._fisher.get, False, peak, step)
            for accumulated in self._fisher.values():
                accumulated.zero_()
            self._since_refresh = 0

    # -- trainer hooks --------------------------------------------------------------------

    def on_fit_start(self, trainer: Any) -> None:
        self.total_steps = int(trainer.config.steps)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fisher": dict(self._fisher),
                "since_refresh": self._since_refresh}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._fisher = {k: v.to(local_tensor(self.parameters[k]).device)
                        for k, v in state["fisher"].items()}
        self._since_refresh = int(state["since_refresh"])


def selectable_parameters(backbone: Backbone, include: tuple[str, ...] = (),
                          exclude: tuple[str, ...] = ()) -> dict[str, torch.nn.Parameter]:
    """Pretrained parameters SFAS may select from (name regexes; default every one)."""
    pretrained = backbone.pretrained_parameters()
    names = match_names(pretrained, include, exclude)
    if not names:
        raise ValueError(f"no pretrained parameter matches include={list(include)} "
                         f"exclude={list(exclude)}")
    return {name: pretrained[name] for name in names}


def attach_sfas(adaptation: Adaptation, entries: int, config: SFASConfig) -> FisherSelection:
    """Add an SFAS masked update of ``entries`` (see FisherSelection) to ``adaptation``."""
    parameters = selectable_parameters(adaptation.backbone, config.include, config.exclude)
    selection = FisherSelection(parameters, entries, config)
    adaptation.add_masked_update(selection)
    return selection


@register_method("sfas", SFASConfig, "SFAS alone: annealed Fisher top-k of the pretrained "
                                     "weights, refreshed every R steps (paper ablation)")
def apply_sfas(backbone: Backbone, budget: float, config: SFASConfig) -> Adaptation:
    adaptation = Adaptation(backbone, "sfas", budget, dataclasses.asdict(config))
    attach_sfas(adaptation, budget_entries(backbone, budget), config)
    return adaptation
