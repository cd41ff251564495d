"""Distributed training with 2 Gloo processes on CPU, spawned by the tests themselves.

One spawn of two ranks (a module fixture) runs every distributed case and saves what it saw;
the tests compare it with single-process computations:

- DDP WeatherPEFT, 3 steps of batch 1 per rank: identical weights and masks on both ranks,
  equal (within float tolerance) to one process with batch 2 — same seed, same data order;
- the sharded global top-k (FSDP's selection) equals the unsharded ``select_top_k``, ties
  across shard boundaries included, and SFAS on sharded DTensors selects the unsharded mask;
- FSDP2 WeatherPEFT trains like DDP, and its gathered adapter loads on one process;
- an adapter saved by a DDP run loads on one process and gives the same outputs.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import load_pretrained_tiny
from helpers import outputs

from weatherpeft import distributed
from weatherpeft.adapters import load_adapter
from weatherpeft.methods import sfas
from weatherpeft.methods.masked_update import MaskedUpdate
from weatherpeft.methods.registry import apply_method
from weatherpeft.methods.selection import select_top_k
from weatherpeft.methods.sfas import FisherSelection, SFASConfig, block_noise
from weatherpeft.train import TrainConfig, Trainer, seed_everything

WORLD = 2
MARCH = {"train": ("2003-03-01", "2003-03-06"), "val": ("2003-03-07", "2003-03-09"),
         "test": ("2003-03-07", "2003-03-09")}


# --------------------------------------------------------------------------------------
# What the ranks run
# --------------------------------------------------------------------------------------


def march_task():
    from weatherpeft.data.builtin import store_path
    from weatherpeft.tasks.forecasting import ForecastingTask

    return ForecastingTask(store_path("downstream"), MARCH, load_pretrained_tiny().stats,
                           lead_steps=(1,))


def fine_tune(task, out_dir, strategy, batch_size, method="weatherpeft", steps=3, lr=1e-3,
              accumulation_steps=1, val_batches=2, **options):
    """WeatherPEFT (budget 0.04) on aurora-tiny: seeded as ``weatherpeft finetune`` seeds."""
    seed_everything(0)
    adaptation = apply_method(method, load_pretrained_tiny(), 0.04, options)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, grad_clip=1.0, log_every=1,
                         val_every=steps, val_batches=val_batches, progress=False,
                         out_dir=str(out_dir), strategy=strategy,
                         accumulation_steps=accumulation_steps)
    trainer = Trainer(adaptation, task, config, hooks=adaptation.hooks,
                      param_groups=adaptation.param_groups(config.weight_decay))
    summary = trainer.fit()
    return adaptation, trainer, summary


def trained_state(adaptation, summary, out_dir) -> dict:
    """This rank's weights and selection, with flat offsets to place shards in full tensors,
    and the run's metric log (written by rank 0)."""
    update = adaptation.masked_updates[0]
    log = Path(out_dir) / "metrics.jsonl"
    return {"log": [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else None,
            "weights": {n: distributed.local_tensor(p.detach()).clone()
                        for n, p in adaptation.named_parameters()},
            "offsets": {n: distributed.shard_offset(p) for n, p in adaptation.named_parameters()},
            "selection": {n: idx + distributed.shard_offset(update.parameters[n])
                          for n, idx in update.selection.items()},
            "summary": summary}


def sample_batch():
    task = march_task()
    return task.collate([task.datasets()["val"][0]])[0]


def row_shard(full: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    """FSDP's dim-0 shard of ``full`` on ``rank`` (torch.chunk rows) and its flat offset."""
    rows = full.shape[0]
    per_rank = math.ceil(rows / WORLD)
    start = min(rank * per_rank, rows)
    stop = min(rows, start + per_rank)
    return full[start:stop].reshape(-1), start * (full.numel() // rows)


def top_k_cases() -> list[tuple[list[torch.Tensor], int]]:
    """Blocks full of ties (few distinct values, constant blocks, -inf), 1-row blocks whose
    second shard is empty, and k from 0 to every entry."""
    generator = torch.Generator().manual_seed(5)
    blocks = [torch.randint(0, 4, (5, 3), generator=generator).float(),
              torch.ones(1, 4),
              torch.full((7, 2), 2.0),
              torch.randint(0, 3, (4,), generator=generator).float(),
              torch.tensor([[3.0, -math.inf], [-math.inf, 3.0], [1.0, 2.0]])]
    total = sum(b.numel() for b in blocks)
    return [(blocks, k) for k in (0, 1, 4, 9, total // 2, total - 1, total)]


def sharded_top_k_results(rank: int) -> list[list[int]]:
    """This rank's part of each case's global top k, as global positions."""
    results = []
    for blocks, k in top_k_cases():
        shards = [row_shard(b, rank) for b in blocks]
        offsets = torch.tensor([0] + [b.numel() for b in blocks]).cumsum(0).tolist()
        positions = [offsets[i] + start for i, (_, start) in enumerate(shards)]
        chosen = distributed.sharded_top_k(lambda i, shards=shards: shards[i][0].clone(),
                                           [s.numel() for s, _ in shards], positions, k)
        results.append(sorted(int(p) + i for idx, p in zip(chosen, positions) for i in idx))
    return results


SFAS_MODES = {"additive": {"gamma": 0.5}, "multiplicative": {"gamma": 0.5, "noise": "multiplicative"},
              "strict": {"gamma": 0.5, "budget_mode": "strict"},
              "refresh_every_2": {"gamma": 0.5, "refresh_every": 2}}


def sfas_tensors() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Parameters (shards of 1 to 9 rows) and 4 steps of gradients with ties and zeros."""
    generator = torch.Generator().manual_seed(11)
    shapes = {"a": (9, 4), "b": (3,), "c": (1, 5), "d": (6, 6)}
    weights = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
    grads = [{n: (torch.randint(-3, 4, s, generator=generator) * 0.25).float()
              for n, s in shapes.items()} for _ in range(4)]
    return weights, grads


def sfas_selections(mesh=None) -> dict[str, list[list[int]]]:
    """Per mode and step, the global positions SFAS selects (on shards if ``mesh``)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    weights, grads = sfas_tensors()
    offsets = dict(zip(weights, torch.tensor([0] + [w.numel() for w in weights.values()])
                       .cumsum(0).tolist()))
    results = {}
    for mode, options in SFAS_MODES.items():
        def place(t):
            return t.clone() if mesh is None else distribute_tensor(t.clone(), mesh, [Shard(0)])

        parameters = {n: torch.nn.Parameter(place(w)) for n, w in weights.items()}
        selection = FisherSelection(parameters, 20, SFASConfig(**options))
        selection.total_steps = len(grads)
        steps = []
        for step, gradient in enumerate(grads):
            for name, parameter in parameters.items():
                parameter.grad = place(gradient[name])
            selection.update_selection(None, step)
            for name, indices in selection.selection.items():
                selection.mark_moved(name, indices)  # as if every selected entry moved
            steps.append(sorted(int(i) + offsets[n] + distributed.shard_offset(parameters[n])
                                for n, idx in selection.selection.items() for i in idx))
        results[mode] = steps
    return results


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), WEATHERPEFT_CHECK_MASKS="1")
    torch.set_num_threads(1)
    out = Path(out)
    assert distributed.init("cpu") and distributed.world_size() == WORLD
    results: dict = {"top_k": sharded_top_k_results(rank)}
    update = MaskedUpdate({"w": torch.nn.Parameter(torch.zeros(10))}, 2)
    update.set_selection({"w": torch.tensor([rank, 5])})  # different masks on the two ranks
    try:
        update._check_across_ranks(step=0)
        results["mask_check"] = None
    except RuntimeError as error:
        results["mask_check"] = str(error)
    from torch.distributed.tensor import init_device_mesh

    sfas._NOISE_CHUNK = 16  # shards then cut noise chunks: the chunked noise is exercised
    results["sfas"] = sfas_selections(init_device_mesh("cpu", (WORLD,)))
    sfas._NOISE_CHUNK = 1 << 18
    task = march_task()
    batch = sample_batch()
    adaptation, _, summary = fine_tune(task, out / "ddp", "ddp", 1)
    results["ddp"] = trained_state(adaptation, summary, out / "ddp")
    if distributed.is_main():
        from weatherpeft.adapters import save_adapter

        save_adapter(adaptation, out / "ddp_adapter")
        results["ddp_outputs"] = outputs(adaptation, batch)
    adaptation, _, summary = fine_tune(task, out / "fsdp", "fsdp", 1)
    results["fsdp"] = trained_state(adaptation, summary, out / "fsdp")
    copy = distributed.consolidated_copy(
        adaptation, lambda: apply_method("weatherpeft", load_pretrained_tiny(), 0.04))
    if distributed.is_main():
        from weatherpeft.adapters import save_adapter

        save_adapter(copy, out / "fsdp_adapter")
        results["fsdp_outputs"] = outputs(copy, batch)
        results["fsdp_report"] = copy.report()
    try:  # a method whose hook cannot work on shards refuses FSDP when the Trainer is built
        fine_tune(task, out / "child", "fsdp", 1, method="child_tuning")
        results["child_tuning_fsdp"] = None
    except ValueError as error:
        results["child_tuning_fsdp"] = str(error)
    # Other kinds of methods under DDP: HF peft LoRA, SSF hooks, a fixed Fisher mask.
    for method, options in (("lora", {}), ("ssf", {}), ("child_tuning", {"fisher_batches": 2})):
        adaptation, _, _ = fine_tune(task, out / method, "ddp", 1, method=method, steps=1, **options)
        results[method] = {n: p.detach().clone() for n, p in adaptation.named_parameters()
                           if p.requires_grad}
    torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    """Run :func:`_worker` on 2 Gloo ranks; every rank's results and the output folder."""
    out = tmp_path_factory.mktemp("distributed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out


@pytest.fixture(scope="module")
def single_process(march_task, tmp_path_factory):
    """One process accumulating WORLD micro-batches of 1: the same arithmetic as 2 DDP ranks × 1.

    Each micro-batch's forward and backward are those of one rank; backward of loss/2 scales
    every gradient by exactly 1/2 (a power of two), as DDP's division before its all-reduce
    does, and a sum of two terms does not depend on their order. So the training is bitwise
    equal, not merely close (a batch of 2 in one forward sums in another order: relative
    differences of ~1e-5 in the loss after two Adam steps). Validation sees the same 4 samples
    (2 global batches of 2) in batches of 1, so its mean sums in another order.
    """
    out = tmp_path_factory.mktemp("single") / "run"
    adaptation, _, summary = fine_tune(march_task, out, "none", 1, accumulation_steps=WORLD,
                                       val_batches=2 * WORLD)
    return trained_state(adaptation, summary, out)


def full_weights(state: list[dict]) -> dict[str, torch.Tensor]:
    """Flat full tensors from every rank's shards."""
    names = state[0]["weights"]
    return {n: torch.cat([s["weights"][n].reshape(-1) for s in
                          sorted(state, key=lambda s: s["offsets"][n])]) for n in names}


# --------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------


def assert_same_training(run: dict, reference: dict, weights: dict[str, torch.Tensor]) -> None:
    """Same losses and gradient norms step by step, same masks and weights, to float tolerance.

    Different reduction orders change gradients in the last bits; an entry whose score ties
    with the k-th to that precision may then swap with its neighbour in the mask. Up to k/1000
    such swaps are accepted (none occur in these runs today); the entries they move may
    differ by a few learning rates, every other entry by at most 1e-5.
    """
    for mine, theirs in zip(run["log"], reference["log"], strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (mine["step"], key)
    k = sum(v.numel() for v in reference["selection"].values())
    selection = run["selection"]
    assert sum(v.numel() for v in selection.values()) == k
    swapped = sum(int((~torch.isin(selection[n], reference["selection"][n])).sum()) for n in selection)
    assert swapped <= k // 1000
    far = 0
    for name, value in reference["weights"].items():
        difference = (weights[name].reshape(-1) - value.reshape(-1)).abs()
        assert float(difference.max()) <= 3e-3, name  # 3 steps of lr 1e-3
        far += int((difference > 1e-5).sum())
    assert far <= 2 * swapped


def test_ddp_ranks_end_with_identical_weights_and_masks(ranks):
    results, _ = ranks
    first, second = results[0]["ddp"], results[1]["ddp"]
    for name, value in first["weights"].items():
        assert torch.equal(value, second["weights"][name]), name
    for name, value in first["selection"].items():
        assert torch.equal(value, second["selection"][name]), name
    timing = ("samples_per_s",)
    assert {k: v for k, v in first["summary"].items() if k not in timing} == \
        {k: v for k, v in second["summary"].items() if k not in timing}
    for method in ("lora", "ssf", "child_tuning"):
        for name, value in results[0][method].items():
            assert torch.equal(value, results[1][method][name]), (method, name)


def test_ddp_trains_bitwise_like_one_process_accumulating_the_ranks_batches(ranks, single_process):
    ddp = ranks[0][0]["ddp"]
    assert [record["step"] for record in ddp["log"]] == [1, 2, 3]
    for mine, theirs in zip(ddp["log"], single_process["log"], strict=True):
        assert (mine["loss"], mine["grad_norm"]) == (theirs["loss"], theirs["grad_norm"]), mine["step"]
    assert ddp["log"][-1]["val_loss"] == pytest.approx(single_process["log"][-1]["val_loss"], rel=1e-6)
    for name, value in single_process["selection"].items():
        assert torch.equal(ddp["selection"][name].sort().values, value.sort().values), name
    for name, value in single_process["weights"].items():
        assert torch.equal(ddp["weights"][name], value), name
    # and the weights did train: not a comparison of two untouched models
    pretrained = load_pretrained_tiny().pretrained_parameters()
    moved = sum(int((ddp["weights"]["backbone." + n] != p.detach()).sum()) for n, p in pretrained.items())
    assert moved > 0


def test_sharded_top_k_equals_the_unsharded_selection(ranks):
    results, _ = ranks
    for case, (blocks, k) in enumerate(top_k_cases()):
        chosen = select_top_k(lambda i, blocks=blocks: blocks[i].reshape(-1).clone(), [b.numel() for b in blocks], k)
        offsets = torch.tensor([0] + [b.numel() for b in blocks]).cumsum(0).tolist()
        expected = sorted(int(i) + offsets[b] for b, idx in enumerate(chosen) for i in idx)
        merged = sorted(results[0]["top_k"][case] + results[1]["top_k"][case])
        assert merged == expected, (case, k)
        assert len(set(results[0]["top_k"][case]) & set(results[1]["top_k"][case])) == 0


def test_sfas_on_shards_selects_the_unsharded_mask(ranks, monkeypatch):
    results, _ = ranks
    monkeypatch.setattr(sfas, "_NOISE_CHUNK", 16)
    expected = sfas_selections()
    for mode, steps in expected.items():
        for step, positions in enumerate(steps):
            merged = sorted(results[0]["sfas"][mode][step] + results[1]["sfas"][mode][step])
            assert merged == positions, (mode, step)


def test_fsdp_trains_like_ddp_and_its_adapter_loads_on_one_process(ranks):
    results, out = ranks
    fsdp = [r["fsdp"] for r in results]
    merged = {**fsdp[0], "selection": {n: torch.cat([s["selection"][n] for s in fsdp]).sort().values
                                       for n in fsdp[0]["selection"]}}
    assert_same_training(merged, results[0]["ddp"], full_weights(fsdp))
    loaded = load_adapter(out / "fsdp_adapter", load_pretrained_tiny())
    for name, value in outputs(loaded, sample_batch()).items():
        assert torch.equal(value, results[0]["fsdp_outputs"][name]), name
    assert results[0]["fsdp_report"] == loaded.report()
    assert loaded.report().stored > loaded.report().trainable > 0  # union of masks, gathered


def test_the_debug_check_catches_masks_that_differ_between_ranks(ranks):
    results, _ = ranks
    for rank in range(WORLD):
        assert "differs between ranks" in results[rank]["mask_check"]


def test_methods_that_cannot_select_on_shards_refuse_fsdp_at_setup(ranks):
    message = ranks[0][0]["child_tuning_fsdp"]
    assert message is not None and "ChildTuningD" in message and "ddp" in message


def test_an_adapter_from_a_ddp_run_loads_on_one_process(ranks):
    results, out = ranks
    loaded = load_adapter(out / "ddp_adapter", load_pretrained_tiny())
    expected = results[0]["ddp_outputs"]
    got = outputs(loaded, sample_batch())
    assert got.keys() == expected.keys()
    for name, value in got.items():
        assert torch.equal(value, expected[name]), name


def test_noise_of_a_shard_is_the_noise_at_its_positions(monkeypatch):
    monkeypatch.setattr(sfas, "_NOISE_CHUNK", 64)
    full = block_noise(3, 1000, 0, 1000)
    for start, count in ((0, 1), (5, 100), (60, 10), (63, 700), (999, 1), (400, 0)):
        assert torch.equal(block_noise(3, 1000, start, count), full[start:start + count])
    assert not torch.equal(block_noise(4, 1000, 0, 1000), full)


def test_single_process_helpers_answer_for_a_world_of_one():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert not distributed.init("cpu")
    assert distributed.all_reduce([1.5, 2.0]).tolist() == [1.5, 2.0]
    chosen = distributed.sharded_top_k(lambda i: torch.tensor([1.0, 3.0, 3.0]), [3], [0], 2)
    assert chosen[0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="zero")


def test_a_strategy_without_torchrun_trains_in_one_process(march_task, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="weatherpeft.training"):
        _, trainer, summary = fine_tune(march_task, tmp_path / "run", "ddp", 1, method="lora", steps=1)
    assert trainer.strategy == "none" and trainer.world_size == 1 and trainer.wrapped is trainer.model
    assert "without torchrun" in caplog.text and summary["step"] == 1
