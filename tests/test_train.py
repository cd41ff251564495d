"""The Trainer: schedule, parameter groups, accumulation, hooks, logging, exact resume."""

from __future__ import annotations

import contextlib
import json
import math
from datetime import datetime, timedelta

import pytest
import torch
from aurora import Batch, Metadata

from weatherpeft.metrics import mse
from weatherpeft.tasks.base import Task, TaskVariables
from weatherpeft.training import (
    TrainConfig,
    Trainer,
    TrainingHook,
    default_param_groups,
    epoch_permutation,
    latest_checkpoint,
    load_model_state,
    lr_factor,
)
from weatherpeft.training.data_order import epoch_batches, validation_batches

H, W = 4, 8
LAT = torch.linspace(67.5, -67.5, H)
LON = torch.arange(W) * 45.0


def toy_batch(field: torch.Tensor, time: datetime) -> Batch:
    """A Batch with one surface variable "2t" shaped (1, T, H, W)."""
    return Batch(surf_vars={"2t": field[None]}, static_vars={}, atmos_vars={},
                 metadata=Metadata(lat=LAT, lon=LON, time=(time,), atmos_levels=()))


class ToySamples(torch.utils.data.Dataset):
    """target = 0.6·x₁ − 0.3·x₀ + 0.5 on random fields: learnable by a linear map."""

    def __init__(self, n: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(n, 2, H, W, generator=generator)
        self.targets = 0.6 * self.inputs[:, 1:] - 0.3 * self.inputs[:, :1] + 0.5

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Batch, Batch]:
        time = datetime(2000, 1, 1) + timedelta(hours=6 * index)
        return toy_batch(self.inputs[index], time), toy_batch(self.targets[index], time)


class ToyTask(Task):
    name = "toy"

    def __init__(self, n_train: int = 10, n_val: int = 4):
        self._splits = {"train": ToySamples(n_train, 0), "val": ToySamples(n_val, 1),
                        "test": ToySamples(n_val, 2)}

    @property
    def variables(self) -> TaskVariables:
        return TaskVariables(surf_vars=("2t",), atmos_vars=(), static_vars=(), levels=())

    def datasets(self):
        return self._splits

    def loss(self, prediction: Batch, target: Batch) -> torch.Tensor:
        return mse(prediction.surf_vars["2t"], target.surf_vars["2t"], target.metadata.lat)

    def evaluate(self, model, loader):
        losses = [self.loss(model(inputs), target).item() for inputs, target in loader]
        return {"mse": sum(losses) / len(losses)}


class ToyModel(torch.nn.Module):
    """A per-point linear map over the history, a 1-D gain, optional dropout."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.mix = torch.nn.Linear(2, 1)
        self.gain = torch.nn.Parameter(torch.ones(1))
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, batch: Batch) -> Batch:
        x = batch.surf_vars["2t"].movedim(1, -1)  # (B, H, W, T)
        y = self.mix(self.dropout(x)).movedim(-1, 1) * self.gain
        return Batch(surf_vars={"2t": y}, static_vars=batch.static_vars, atmos_vars={},
                     metadata=batch.metadata)


def config(tmp_path, **overrides) -> TrainConfig:
    values = dict(steps=6, batch_size=2, lr=0.05, weight_decay=0.01, log_every=1,
                  out_dir=str(tmp_path), progress=False, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------


def test_warmup_then_cosine_schedule():
    factor = lambda s: lr_factor(s, total_steps=14, warmup_steps=4, min_lr_ratio=0.1)  # noqa: E731
    assert [factor(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert factor(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert factor(14) == pytest.approx(0.1) and factor(20) == pytest.approx(0.1)
    assert lr_factor(0, total_steps=10, warmup_steps=0, min_lr_ratio=0.0) == 1.0


def test_trainer_applies_the_schedule(tmp_path):
    seen = []

    class RecordLR(TrainingHook):
        def on_before_optimizer_step(self, trainer, step):
            seen.append(trainer.optimizer.param_groups[0]["lr"])

    cfg = config(tmp_path, steps=8, warmup_steps=3, min_lr_ratio=0.2, batch_size=1)
    Trainer(ToyModel(), ToyTask(), cfg, hooks=[RecordLR()]).fit()
    expected = [0.05 * lr_factor(s, total_steps=8, warmup_steps=3, min_lr_ratio=0.2) for s in range(8)]
    assert seen == pytest.approx(expected)
    assert [r["lr"] for r in records(tmp_path)] == pytest.approx(expected)


def test_param_groups_split_decay_and_skip_frozen():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4),
                                torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[3].weight.requires_grad_(False)
    decay, no_decay = default_param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay) == {id(model[0].weight), id(model[1].weight)}
    assert ids(no_decay) == {id(model[1].bias), id(model[2].weight), id(model[2].bias),
                             id(model[3].bias)}
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        default_param_groups(frozen, 0.1)


def test_custom_param_groups_are_used(tmp_path):
    model = ToyModel()
    groups = [{"params": [model.mix.weight], "lr": 0.1, "weight_decay": 0.0},
              {"params": [model.mix.bias, model.gain], "weight_decay": 0.0}]
    model.gain.requires_grad_(False)
    trainer = Trainer(model, ToyTask(), config(tmp_path), param_groups=groups)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.1, 0.05]
    assert len(trainer.optimizer.param_groups[1]["params"]) == 1  # frozen gain dropped


def test_loss_decreases_and_log_is_written(tmp_path):
    cfg = config(tmp_path, steps=40, lr=0.05, val_every=10, val_batches=2, log_every=5)
    summary = Trainer(ToyModel(), ToyTask(), cfg).fit()
    log = records(tmp_path)
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30, 35, 40]
    for record in log:
        assert {"step", "loss", "lr", "grad_norm", "samples_per_s"} <= set(record)
        assert record["samples_per_s"] > 0
    assert [r["step"] for r in log if "val_loss" in r] == [10, 20, 30, 40]
    assert log[-1]["loss"] < 0.2 * log[0]["loss"]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert val[-1] < val[0]
    assert summary["step"] == 40 and summary["val_loss"] == log[-1]["val_loss"]
    assert latest_checkpoint(tmp_path).name == "step_00000040.pt"


def test_accumulation_matches_a_larger_batch(tmp_path):
    def train(batch_size: int, accumulation: int, where: str) -> ToyModel:
        torch.manual_seed(0)
        model = ToyModel()
        cfg = config(tmp_path / where, steps=5, batch_size=batch_size, grad_clip=1.0,
                     accumulation_steps=accumulation)
        Trainer(model, ToyTask(), cfg).fit()
        return model

    big, accumulated = train(2, 1, "big"), train(1, 2, "acc")
    for a, b in zip(big.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hooks_run_after_clipping_and_before_the_step(tmp_path):
    calls = []

    class Freeze(TrainingHook):
        """Zeroes the bias gradient: if that happens before optimizer.step(), it never moves."""

        def on_before_optimizer_step(self, trainer, step):
            norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()])
            calls.append(("before", step, trainer.step, float(norm)))
            trainer.model.mix.bias.grad.zero_()

        def on_after_optimizer_step(self, trainer, step):
            calls.append(("after", step, trainer.step, None))

    torch.manual_seed(0)
    model = ToyModel()
    bias, weight = model.mix.bias.detach().clone(), model.mix.weight.detach().clone()
    Trainer(model, ToyTask(), config(tmp_path, steps=3, grad_clip=0.01), hooks=[Freeze()]).fit()
    assert torch.equal(model.mix.bias, bias)  # no decay on 1-D params, zero gradient: frozen
    assert not torch.equal(model.mix.weight, weight)
    assert [c[:3] for c in calls] == [("before", 0, 0), ("after", 0, 1), ("before", 1, 1),
                                      ("after", 1, 2), ("before", 2, 2), ("after", 2, 3)]
    assert all(c[3] <= 0.01 * (1 + 1e-5) for c in calls if c[0] == "before")  # clipped already


def test_a_hook_must_be_a_training_hook(tmp_path):
    class DuckTyped:
        def on_before_optimizer_step(self, trainer, step):
            pass

    with pytest.raises(TypeError, match="not a TrainingHook"):
        Trainer(ToyModel(), ToyTask(), config(tmp_path), hooks=[DuckTyped()])


class GradientSum(TrainingHook):
    """A stateful hook (like SFAS's Fisher accumulator) that must survive a resume."""

    def __init__(self):
        self.total = torch.zeros(1, 2)

    def on_before_optimizer_step(self, trainer, step):
        self.total += trainer.model.mix.weight.grad.square()

    def state_dict(self):
        return {"total": self.total.clone()}

    def load_state_dict(self, state):
        self.total = state["total"].clone()


def test_resume_is_bit_identical(tmp_path):
    settings = dict(steps=6, batch_size=2, accumulation_steps=2, warmup_steps=2,
                    min_lr_ratio=0.1, grad_clip=0.5, val_every=2, val_batches=1,
                    checkpoint_every=0, log_every=1)

    def build(where: str, seed: int):
        torch.manual_seed(seed)  # different initial weights: the checkpoint must restore them
        model, hook = ToyModel(dropout=0.2), GradientSum()
        trainer = Trainer(model, ToyTask(n_train=10), config(tmp_path / where, **settings),
                          hooks=[hook])
        return trainer, model, hook

    straight, straight_model, straight_hook = build("straight", 0)
    straight.fit()

    first, _, _ = build("resumed", 0)
    first.fit(until_step=3)  # 6 batches of 5 per epoch: stops inside epoch 1
    assert (first.step, first.epoch, first.batch_in_epoch) == (3, 1, 1)
    torch.randn(100)  # disturb the global RNG: resume must restore it
    second, resumed_model, resumed_hook = build("resumed", 123)
    second.fit(resume=True)

    assert second.step == 6
    for (name, a), b in zip(straight_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(straight_hook.total, resumed_hook.total)
    for a, b in zip(straight.optimizer.state.values(), second.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    keep = lambda log: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in log]  # noqa: E731
    assert keep(records(tmp_path / "straight")) == keep(records(tmp_path / "resumed"))


def test_resume_truncates_a_log_written_after_the_checkpoint(tmp_path):
    trainer = Trainer(ToyModel(), ToyTask(), config(tmp_path, steps=4))
    trainer.fit(until_step=2)
    with open(tmp_path / "metrics.jsonl", "a") as stream:  # a run that died after step 3
        stream.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    Trainer(ToyModel(), ToyTask(), config(tmp_path, steps=4)).fit(resume=True)
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]
    assert records(tmp_path)[2]["loss"] != 1.0


def test_fresh_fit_refuses_a_used_out_dir_and_resume_without_checkpoint_starts(tmp_path):
    Trainer(ToyModel(), ToyTask(), config(tmp_path / "a", steps=2)).fit(resume=True)
    assert latest_checkpoint(tmp_path / "a").name == "step_00000002.pt"
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(ToyModel(), ToyTask(), config(tmp_path / "a", steps=2)).fit()


def test_checkpoints_are_pruned_and_model_weights_load_alone(tmp_path):
    torch.manual_seed(0)
    model = ToyModel()
    Trainer(model, ToyTask(), config(tmp_path, steps=6, checkpoint_every=1,
                                     keep_checkpoints=2)).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000005.pt", "step_00000006.pt"]
    fresh = ToyModel()
    assert load_model_state(fresh, tmp_path / "checkpoints" / names[-1]) == 6
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt"):
        load_model_state(fresh, tmp_path / "broken.pt")


def test_trainable_only_checkpoints_resume(tmp_path):
    def build():
        torch.manual_seed(0)
        model = ToyModel()
        model.gain.requires_grad_(False)
        return model, Trainer(model, ToyTask(), config(tmp_path, steps=4,
                                                       checkpoint_trainable_only=True))

    _, trainer = build()
    trainer.fit(until_step=2)
    state = torch.load(latest_checkpoint(tmp_path), weights_only=True)
    assert "gain" not in state["model"] and "mix.weight" in state["model"]
    model, trainer = build()
    trainer.fit(resume=True)
    assert trainer.step == 4


def test_evaluate_amp_and_activation_checkpointing_switches(tmp_path, caplog):
    class Checkpointable(ToyModel):
        configured = False

        def configure_activation_checkpointing(self):
            self.configured = True

    model = Checkpointable()
    with caplog.at_level("INFO", logger="weatherpeft.training"):
        trainer = Trainer(model, ToyTask(), config(tmp_path, amp="bf16",
                                                   activation_checkpointing=True))
    assert model.configured
    assert "CUDA-only" in caplog.text
    assert isinstance(trainer.autocast(), contextlib.nullcontext)
    results = trainer.evaluate(split="test")
    assert set(results) == {"mse"} and math.isfinite(results["mse"])
    assert model.training


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="accumulation_steps"):
        TrainConfig(accumulation_steps=0)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_permutation(20, 0, 0), epoch_permutation(20, 0, 1)
    assert sorted(a.tolist()) == list(range(20))
    assert torch.equal(a, epoch_permutation(20, 0, 0)) and not torch.equal(a, b)


def test_ranks_slice_each_global_batch_and_pad_an_empty_slice():
    # 5 samples, 2 per rank, 2 ranks: global batches [0..3] and [4]; rank 1's second is empty.
    assert epoch_batches(5, seed=0, epoch=0, start=0, batch_size=2, world=2, rank=0) \
        == [epoch_permutation(5, 0, 0).tolist()[:2]]
    assert validation_batches(5, 8, 2, 2, 0) == ([[0, 1], [4]], frozenset())
    assert validation_batches(5, 8, 2, 2, 1) == ([[2, 3], [4]], frozenset({1}))
    assert validation_batches(5, 1, 2, 2, 1) == ([[2, 3]], frozenset())
