"""select_top_k against a stable full sort: ties, signed zeros, −inf, dense clusters, errors,
and the call contract (calls per block, no block held past the next request)."""

from __future__ import annotations

import math
import weakref
from collections import Counter
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weatherpeft.methods import selection
from weatherpeft.methods.selection import select_top_k

INF = math.inf


@pytest.fixture(params=["default-slack", "slack-1"])
def slack(request):
    """Run each case as shipped and with the pool's minimum slack at 1 (capacity 2k), so that
    small cases go through many cuts, not only the final one."""
    if request.param == "slack-1":
        with mock.patch.object(selection, "_MIN_SLACK", 1):
            yield
    else:
        yield


def reference(blocks: list[torch.Tensor], k: int) -> list[np.ndarray]:
    """Stable descending sort of the concatenation, first k positions, split per block."""
    values = np.concatenate([b.numpy() for b in blocks]) if blocks else np.zeros(0, np.float32)
    chosen = np.sort(np.argsort(-values, kind="stable")[:k])
    bounds = np.cumsum([0] + [b.numel() for b in blocks])
    return [chosen[(chosen >= lo) & (chosen < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def run(blocks: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """select_top_k on fresh copies of ``blocks``; checks the call contract on the way."""
    calls: Counter[int] = Counter()
    handed_out: list[weakref.ref] = []

    def scores(i: int) -> torch.Tensor:
        assert all(ref() is None for ref in handed_out), "an earlier block's storage is still held"
        calls[i] += 1
        storage = blocks[i].numpy().copy()  # lives exactly as long as some tensor uses it
        handed_out.append(weakref.ref(storage))
        return torch.from_numpy(storage)

    result = select_top_k(scores, [b.numel() for b in blocks], k)
    assert max(calls.values(), default=0) <= 3
    assert len(result) == len(blocks)
    for r in result:
        assert r.dtype == torch.int64 and r.dim() == 1
        assert bool((r[1:] > r[:-1]).all())
    assert sum(r.numel() for r in result) == k
    return result


def check(blocks: list[torch.Tensor], k: int) -> None:
    got = run(blocks, k)
    want = reference(blocks, k)
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g.numpy(), w, err_msg=f"block {i}")


def split(values: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return [b.clone() for b in values.split(sizes)]


def random_sizes(rng: np.random.Generator, n_blocks: int, largest: int) -> list[int]:
    sizes = rng.integers(0, largest, n_blocks).tolist()
    return sizes + [0, 1, 0, 1]


@pytest.mark.parametrize("where", ["zero", "one", "middle", "total-1", "total"])
def test_random_blocks(where, slack):
    rng = np.random.default_rng(1)
    sizes = random_sizes(rng, 30, 3000)
    rng.shuffle(sizes)
    blocks = split(torch.from_numpy(rng.standard_normal(sum(sizes)).astype(np.float32)), sizes)
    total = sum(sizes)
    k = {"zero": 0, "one": 1, "middle": total // 7, "total-1": total - 1, "total": total}[where]
    check(blocks, k)


@pytest.mark.parametrize("k", [0, 1, 17, 500, 999, 1000, 2999, 3000])
def test_heavy_ties(k, slack):
    rng = np.random.default_rng(2)
    sizes = [0, 1, 400, 1, 0, 1198, 400, 1000]
    values = torch.from_numpy(rng.integers(0, 3, sum(sizes)).astype(np.float32))
    check(split(values, sizes), k)


@pytest.mark.parametrize("k", [0, 1, 250, 999, 1000])
def test_all_equal(k, slack):
    check(split(torch.full((1000,), 0.25), [100, 0, 300, 1, 599]), k)


@pytest.mark.parametrize("k", [1, 5, 40, 200, 380, 399, 400])
def test_negatives_signed_zeros_and_minus_inf(k, slack):
    rng = np.random.default_rng(3)
    specials = np.array([-INF, -0.0, 0.0, -1e-45, 1e-45, -3.5, -1.0, INF], dtype=np.float32)
    values = np.where(rng.random(400) < 0.5, rng.choice(specials, 400),
                      -np.abs(rng.standard_normal(400))).astype(np.float32)
    check(split(torch.from_numpy(values), [0, 150, 1, 99, 150]), k)


def test_signed_zeros_tie_in_position_order(slack):
    """−0 and +0 are equal: the earlier one wins, whatever its sign."""
    blocks = [torch.tensor([1.0, -0.0, 0.0]), torch.tensor([0.0, -0.0])]
    assert [r.tolist() for r in run(blocks, 3)] == [[0, 1, 2], []]
    assert [r.tolist() for r in run(blocks, 2)] == [[0, 1], []]
    check(blocks, 4)


@pytest.mark.parametrize("k", [3, 60, 300, 611, 1000, 1400])
def test_boundary_inside_dense_cluster_of_neighbouring_floats(k, slack):
    """1 + j·ulp for 40 values of j: neighbouring floats and ties around the threshold."""
    rng = np.random.default_rng(4)
    cluster = (1.0 + rng.integers(0, 40, 1600) * np.float32(2.0**-23)).astype(np.float32)
    values = np.concatenate([cluster, [2.0] * 3, np.nextafter(np.float32(1.0), np.float32(0)) * np.ones(50)])
    values = rng.permutation(values).astype(np.float32)
    assert len(np.unique(values)) > 30
    check(split(torch.from_numpy(values), [600, 0, 1, 500, 552]), k)


@pytest.mark.parametrize("k", [1, 10, 1000, 4999])
def test_ascending_blocks_every_block_beats_the_bar(k, slack):
    """Each block is better than all before it: with slack 1 the pool fills and is cut back
    again and again (the worst case for the pool's work)."""
    rng = np.random.default_rng(5)
    sizes = [int(n) for n in rng.integers(1, 200, 50)]
    blocks = [torch.from_numpy((i + rng.random(n)).astype(np.float32)) for i, n in enumerate(sizes)]
    check(blocks, min(k, sum(sizes)))


def test_block_storage_reused_by_the_caller(slack):
    """The callable may overwrite the previous block's storage when asked for the next one."""
    rng = np.random.default_rng(6)
    sizes = [300, 50, 0, 700, 1, 200]
    blocks = split(torch.from_numpy(rng.standard_normal(sum(sizes)).astype(np.float32)), sizes)
    buffer = torch.empty(max(sizes))

    def scores(i: int) -> torch.Tensor:
        view = buffer[: sizes[i]]
        view.copy_(blocks[i])
        return view

    for k in (1, 40, 400, 1251):
        got = select_top_k(scores, sizes, k)
        for g, w in zip(got, reference(blocks, k)):
            np.testing.assert_array_equal(g.numpy(), w)


def test_scores_with_autograd_history(slack):
    rng = np.random.default_rng(8)
    weights = [torch.tensor(rng.standard_normal(n), dtype=torch.float32, requires_grad=True)
               for n in (500, 0, 900)]
    got = select_top_k(lambda i: weights[i] * 2.0, [500, 0, 900], 300)
    for g, w in zip(got, reference([w.detach() for w in weights], 300)):
        np.testing.assert_array_equal(g.numpy(), w)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_matches_stable_sort_property(data):
    sizes = data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=8), label="sizes")
    specials = st.sampled_from([-INF, -2.0, -0.0, 0.0, 1e-45, 1.0, 1.0000001, 3.0, INF])
    value = st.one_of(specials, st.floats(width=32, allow_nan=False))
    values = data.draw(st.lists(value, min_size=sum(sizes), max_size=sum(sizes)), label="values")
    k = data.draw(st.integers(0, sum(sizes)), label="k")
    blocks = split(torch.tensor(values, dtype=torch.float32), sizes)
    check(blocks, k)
    with mock.patch.object(selection, "_MIN_SLACK", 1):
        check(blocks, k)


def test_kth_largest():
    values = torch.tensor([3.0, -0.0, INF, 0.0, -INF, 3.0, 1.0, 2.0, 3.0])
    want = sorted(values.tolist(), reverse=True)
    assert [selection._kth_largest(values, k) for k in range(1, 10)] == want


@pytest.mark.parametrize("k", [0, 3])
def test_nan_is_rejected_naming_the_block(k):
    blocks = [torch.ones(5), torch.ones(0), torch.tensor([1.0, 2.0, math.nan, 0.5]), torch.ones(3)]
    with pytest.raises(ValueError, match="block 2"):
        select_top_k(lambda i: blocks[i].clone(), [5, 0, 4, 3], k)


@pytest.mark.parametrize("position", [10, 2999, 5000 - 3])
def test_nan_in_a_prefiltered_block_is_rejected(position):
    """Blocks of ≥ 1024 entries are checked through their chunk maxima and tail."""
    block = torch.rand(5000)
    block[position] = math.nan
    with pytest.raises(ValueError, match="block 1"):
        select_top_k(lambda i: [torch.rand(2000), block][i].clone(), [2000, 5000], 7)


@pytest.mark.parametrize("k", [-1, 13])
def test_k_outside_range_is_rejected(k):
    with pytest.raises(ValueError, match="cannot select"):
        select_top_k(lambda i: torch.zeros(6), [6, 6], k)


def test_bad_sizes_or_blocks_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        select_top_k(lambda i: torch.zeros(3), [3, -1], 0)
    with pytest.raises(ValueError, match=r"scores\(1\)"):
        select_top_k(lambda i: torch.zeros(4 if i == 0 else 5), [4, 4], 2)
    with pytest.raises(ValueError, match=r"scores\(0\)"):
        select_top_k(lambda i: torch.zeros(4, dtype=torch.float64), [4], 2)


def test_no_blocks():
    assert select_top_k(lambda i: torch.zeros(0), [], 0) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_indices_on_the_device_of_the_scores():
    rng = np.random.default_rng(7)
    blocks = split(torch.from_numpy(rng.integers(0, 5, 3000).astype(np.float32)), [1000, 0, 2000])
    got = select_top_k(lambda i: blocks[i].cuda(), [1000, 0, 2000], 700)
    assert all(g.device.type == "cuda" for g in got)
    for g, w in zip(got, reference(blocks, 700)):
        np.testing.assert_array_equal(g.cpu().numpy(), w)
