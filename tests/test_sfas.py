"""SFAS and masked updates: only selected entries move, honest counts, the noise term is real."""

from __future__ import annotations

import pytest
import torch
from conftest import load_pretrained_tiny

from weatherpeft.methods import sfas
from weatherpeft.methods.base import budget_entries
from weatherpeft.methods.masked_update import MaskedUpdate
from weatherpeft.methods.registry import apply_method
from weatherpeft.methods.sfas import FisherSelection, SFASConfig, block_noise, noise_at
from weatherpeft.train import TrainConfig, Trainer


def fine_tune(march_task, tmp_path, method="sfas", budget=0.003, steps=4, **options):
    backbone = load_pretrained_tiny()
    before = {n: p.detach().clone() for n, p in backbone.pretrained_parameters().items()}
    adaptation = apply_method(method, backbone, budget, options)
    config = TrainConfig(steps=steps, batch_size=2, lr=1e-3, log_every=0, progress=False,
                         out_dir=str(tmp_path / "run"), grad_clip=1.0)
    trainer = Trainer(adaptation, march_task, config, hooks=adaptation.hooks,
                      param_groups=adaptation.param_groups(config.weight_decay))
    trainer.fit()
    return adaptation, before, trainer


def changed_entries(adaptation, before) -> dict[str, torch.Tensor]:
    after = adaptation.backbone.pretrained_parameters()
    return {n: torch.nonzero(after[n].detach().reshape(-1) != before[n].reshape(-1)).reshape(-1)
            for n in before}


def test_only_selected_entries_move_and_stored_counts_them(march_task, tmp_path):
    adaptation, before, trainer = fine_tune(march_task, tmp_path)
    (selection,) = adaptation.masked_updates
    changed = changed_entries(adaptation, before)
    n_changed = sum(len(v) for v in changed.values())
    report = adaptation.report()
    assert n_changed > 0
    assert report.stored == n_changed
    moved = selection.moved_indices()
    for name, indices in changed.items():
        expected = moved.get(name, torch.empty(0, dtype=torch.long))
        assert torch.equal(indices, expected), name
    k = budget_entries(adaptation.backbone, 0.003)
    assert report.trainable == k
    assert selection.selected_entries() == k
    # no dense optimizer state for the backbone: AdamW never saw a pretrained gradient
    pretrained_ids = {id(p) for p in adaptation.backbone.pretrained_parameters().values()}
    assert not any(id(p) in pretrained_ids for p in trainer.optimizer.state)


def test_strict_mode_keeps_the_union_within_the_budget(march_task, tmp_path):
    adaptation, before, _ = fine_tune(march_task, tmp_path, budget_mode="strict", steps=5)
    cap = budget_entries(adaptation.backbone, 0.003)
    n_changed = sum(len(v) for v in changed_entries(adaptation, before).values())
    assert 0 < n_changed <= cap
    assert adaptation.report().stored == n_changed


def test_union_mode_grows_beyond_k_under_noise(march_task, tmp_path):
    adaptation, before, _ = fine_tune(march_task, tmp_path, gamma=0.5, steps=4)
    k = budget_entries(adaptation.backbone, 0.003)
    assert adaptation.report().stored > k


def make_selection(parameters, entries, total_steps, **options) -> FisherSelection:
    selection = FisherSelection(parameters, entries, SFASConfig(**options))
    selection.total_steps = total_steps
    return selection


def heavy_tailed_gradients(seed=0) -> dict[str, torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    parameters = {}
    for index, shape in enumerate([(64, 32), (128,), (16, 16, 4)]):
        parameter = torch.nn.Parameter(torch.zeros(shape))
        parameter.grad = torch.randn(shape, generator=generator) ** 3
        parameters[f"p{index}"] = parameter
    return parameters


def selected(selection) -> set[tuple[str, int]]:
    return {(n, int(i)) for n, idx in selection.selection.items() for i in idx}


def fisher_top_k(parameters, k) -> set[tuple[str, int]]:
    flat = [(float(p.grad.reshape(-1)[i] ** 2), n, i) for n, p in parameters.items()
            for i in range(p.numel())]
    flat.sort(key=lambda item: -item[0])
    return {(n, i) for _, n, i in flat[:k]}


def test_gamma_zero_selects_the_fisher_top_k():
    parameters = heavy_tailed_gradients()
    selection = make_selection(parameters, 50, total_steps=10, gamma=0.0)
    selection.update_selection(None, 0)
    assert selected(selection) == fisher_top_k(parameters, 50)


def test_noise_changes_the_selection_early_and_not_at_the_last_step():
    parameters = heavy_tailed_gradients()
    truth = fisher_top_k(parameters, 50)
    changed = {}
    for noise in ("multiplicative", "additive"):
        selection = make_selection(parameters, 50, total_steps=10, gamma=0.2, noise=noise)
        selection.update_selection(None, 0)
        early = selected(selection)
        assert len(early) == 50
        changed[noise] = len(early ^ truth)
        selection.update_selection(None, 9)
        assert selected(selection) == truth  # the last step: γ·(1 − n/t) = 0
    # Multiplicative (the default) swaps entries of similar Fisher; additive noise outweighs the
    # heavy-tailed F/max F of most entries and explores far more.
    assert 0 < changed["multiplicative"] < changed["additive"] and changed["additive"] > 10
    assert SFASConfig().noise == "multiplicative"


def test_refresh_every_r_accumulates_fisher_between_refreshes():
    parameters = heavy_tailed_gradients()
    selection = make_selection(parameters, 20, total_steps=100, gamma=0.0, refresh_every=3)
    selection.update_selection(None, 0)
    first = selected(selection)
    accumulated = {n: torch.zeros_like(p) for n, p in parameters.items()}
    generator = torch.Generator().manual_seed(7)
    for step in (1, 2, 3):
        for name, parameter in parameters.items():
            parameter.grad = torch.randn(parameter.shape, generator=generator)
            accumulated[name] += parameter.grad.square()
        selection.update_selection(None, step)
        if step < 3:
            assert selected(selection) == first  # held between refreshes
    ranked = sorted(((float(v), n, i) for n, s in accumulated.items()
                     for i, v in enumerate(s.reshape(-1))), key=lambda item: -item[0])
    assert selected(selection) == {(n, i) for _, n, i in ranked[:20]}


def test_masked_adamw_matches_torch_adamw_on_the_selected_entries():
    """Two tensors in two optimizer groups (weight decay and none), part of each selected:
    the selected entries follow torch's AdamW exactly, the others do not move."""
    torch.manual_seed(0)
    weights = {"w": torch.randn(6, 5), "b": torch.randn(7)}
    ours = {n: torch.nn.Parameter(w.clone()) for n, w in weights.items()}
    reference = {n: torch.nn.Parameter(w.clone()) for n, w in weights.items()}
    chosen = {"w": torch.tensor([0, 3, 4, 17, 29]), "b": torch.tensor([2, 6])}
    update = MaskedUpdate(ours, 7)
    update.set_selection(chosen)
    groups = [{"params": [ours["w"]], "weight_decay": 0.1}, {"params": [ours["b"]], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=0.01)
    torch_adamw = torch.optim.AdamW([{"params": [reference["w"]], "weight_decay": 0.1},
                                     {"params": [reference["b"]], "weight_decay": 0.0}], lr=0.01)
    trainer = type("T", (), {"optimizer": optimizer})()
    for step in range(5):
        for name in weights:
            grad = torch.randn(weights[name].shape)
            ours[name].grad, reference[name].grad = grad.clone(), grad.clone()
        update.on_after_backward(trainer, step)
        update.on_before_optimizer_step(trainer, step)
        torch_adamw.step()
        for name, indices in chosen.items():
            torch.testing.assert_close(ours[name].data.reshape(-1)[indices],
                                       reference[name].data.reshape(-1)[indices], rtol=1e-6, atol=1e-6)
            unselected = torch.ones(weights[name].numel(), dtype=torch.bool)
            unselected[indices] = False
            assert torch.equal(ours[name].data.reshape(-1)[unselected],
                               weights[name].reshape(-1)[unselected])
            assert ours[name].grad is None
    assert update.stored_entries() == 7
    assert {n: v.tolist() for n, v in update.moved_indices().items()} == \
        {n: v.tolist() for n, v in chosen.items()}


def test_state_is_kept_for_staying_entries_and_dropped_for_leaving_ones():
    parameter = torch.nn.Parameter(torch.zeros(10))
    update = MaskedUpdate({"w": parameter}, 3)
    update.set_selection({"w": torch.tensor([1, 4, 7])})
    update._exp_avg["w"] += torch.tensor([1.0, 4.0, 7.0])
    update._steps["w"] += 2
    update.set_selection({"w": torch.tensor([7, 2, 4])})
    assert update.selection["w"].tolist() == [2, 4, 7]
    assert update._exp_avg["w"].tolist() == [0.0, 4.0, 7.0]
    assert update._steps["w"].tolist() == [0.0, 2.0, 2.0]


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="budget_mode"):
        SFASConfig(budget_mode="sometimes")
    with pytest.raises(ValueError, match="no option"):
        apply_method("sfas", load_pretrained_tiny(), 0.003, {"gama": 0.1})


def test_noise_at_positions_is_the_block_noise_there(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    for chunk in (sfas._NOISE_CHUNK, 64):
        monkeypatch.setattr(sfas, "_NOISE_CHUNK", chunk)
        numel = 1000 if chunk == 64 else 600_001
        full = block_noise(11, numel, 0, numel)
        positions = torch.randint(numel, (3000,), generator=generator).unique()
        assert torch.equal(noise_at(11, numel, positions), full[positions])
        assert torch.equal(noise_at(11, numel, torch.tensor([0, numel - 1])), full[[0, -1]])
        assert noise_at(11, numel, torch.empty(0, dtype=torch.long)).numel() == 0


def heavy_tailed_model(seed: int) -> dict[str, torch.nn.Parameter]:
    """Tensors of many sizes (some below one noise chunk, one across three) with gradients of
    heavy tails, ties (zeros) and one tensor without a gradient."""
    generator = torch.Generator().manual_seed(seed)
    parameters = {}
    for index, shape in enumerate([(300, 200), (7,), (64, 64, 3), (1024,), (700_000,), (50,)]):
        parameter = torch.nn.Parameter(torch.zeros(shape))
        if index != 5:
            grad = torch.randn(shape, generator=generator) ** 3
            grad[torch.rand(shape, generator=generator) < 0.1] = 0.0
            parameter.grad = grad
        parameters[f"p{index}"] = parameter
    return parameters


@pytest.mark.parametrize("options", [{}, {"budget_mode": "strict"}, {"refresh_every": 3},
                                     {"gamma": 1.5, "budget_mode": "strict", "step_fraction": 0.7}])
def test_pruned_selection_is_the_full_selection_entry_for_entry(monkeypatch, options):
    """The refresh that scores only entries able to make the top k selects exactly what
    scoring every entry selects (today's implementation), step after step."""
    pruned_runs = []
    original = FisherSelection._pruned_top_k

    def spy(self, *args, **kwargs):
        chosen = original(self, *args, **kwargs)
        pruned_runs.append(chosen is not None)
        return chosen

    for seed in range(3):
        runs = []
        for prune in (True, False):
            monkeypatch.setattr(FisherSelection, "_pruned_top_k",
                                spy if prune else lambda self, *args, **kwargs: None)
            parameters = heavy_tailed_model(seed)
            selection = make_selection(parameters, 3000, total_steps=8, seed=seed, **options)
            generator = torch.Generator().manual_seed(100 + seed)
            steps = []
            for step in range(8):
                selection.update_selection(None, step)
                steps.append({n: v.clone() for n, v in selection.selection.items()})
                for name, indices in selection.selection.items():
                    selection.mark_moved(name, indices[::2])  # as if half of them moved
                for parameter in parameters.values():
                    if parameter.grad is not None:
                        parameter.grad = parameter.grad * torch.exp(
                            torch.randn(parameter.shape, generator=generator))
            runs.append(steps)
        for step, (pruned, full) in enumerate(zip(*runs)):
            assert pruned.keys() == full.keys()
            for name in pruned:
                assert torch.equal(pruned[name], full[name]), (seed, step, name)
    assert sum(pruned_runs) >= len(pruned_runs) // 2 > 0  # the pruned path did the selecting


def test_block_groups_cover_every_block_once_in_order():
    sizes = [0, 5, 1 << 19, 0, 3, 1 << 20, 1 << 20, 7, 0]
    groups = sfas._block_groups(sizes)
    assert [i for group in groups for i in group] == list(range(len(sizes)))
    assert all(len(group) == 1 for group in groups if any(sizes[i] >= sfas._SMALL_BLOCK for i in group))
    assert all(sum(sizes[i] for i in group) <= sfas._GROUP_ENTRIES for group in groups)
