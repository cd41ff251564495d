"""The public API for hand-written loops (weatherpeft.api): the same weights and losses as the
Trainer for the same seed and data, a user's plain aurora.Aurora adapted in place and round-tripped
through an adapter file and a merge, the encoder/decoder protocol, clear errors, and the example."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from aurora import Aurora
from conftest import PRETRAINED_TINY, load_pretrained_tiny
from helpers import outputs
from safetensors.torch import load_file

import weatherpeft
from weatherpeft.backbones.aurora import AURORA_TINY
from weatherpeft.methods.registry import apply_method
from weatherpeft.train import DivergenceError, TrainConfig, Trainer, epoch_permutation, seed_everything

STEPS, BATCH, LR, SEED = 3, 2, 1e-3, 0


def own_aurora() -> Aurora:
    """A user's plain Aurora: aurora-tiny's architecture with its pretrained weights."""
    model = Aurora(**AURORA_TINY, use_lora=False)
    model.load_state_dict(load_file(PRETRAINED_TINY / "model.safetensors"))
    load_pretrained_tiny().stats.install()  # its statistics, as a user of these weights would
    return model


@pytest.mark.parametrize("method, budget, options", [("weatherpeft", 0.04, {"gamma": 0.5}),
                                                     ("lora", 0.01, {})])
def test_api_loop_equals_the_trainer(march_task, tmp_path, method, budget, options):
    seed_everything(SEED)  # the method's new parameters are drawn from the global RNG
    adaptation = apply_method(method, load_pretrained_tiny(), budget, options)
    config = TrainConfig(steps=STEPS, batch_size=BATCH, lr=LR, seed=SEED, log_every=1,
                         progress=False, out_dir=str(tmp_path / "run"))
    Trainer(adaptation, march_task, config, hooks=adaptation.hooks,
            param_groups=adaptation.param_groups(config.weight_decay)).fit()
    trainer_losses = [json.loads(line)["loss"]
                      for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    seed_everything(SEED)
    model = weatherpeft.adapt(load_pretrained_tiny(), method, budget, **options)
    seed_everything(SEED)  # as Trainer.fit does
    model.configure_optimizer(steps=STEPS, lr=LR)
    model.train()
    dataset = march_task.datasets()["train"]
    order = epoch_permutation(len(dataset), SEED, 0).tolist()
    losses = []
    for step in range(STEPS):
        batch = march_task.collate([dataset[i] for i in order[step * BATCH:(step + 1) * BATCH]])
        loss = march_task.training_loss(model, batch)
        loss.backward()
        losses.append(model.step(loss)[0])
    assert losses == trainer_losses
    assert model.steps_taken == STEPS
    theirs = dict(adaptation.named_parameters())
    for name, parameter in model.adaptation.named_parameters():
        assert torch.equal(parameter, theirs[name]), name


def test_a_plain_aurora_is_adapted_in_place_saved_loaded_and_merged(builtin_batches, tmp_path):
    batch, target = builtin_batches
    aurora = own_aurora()
    model = weatherpeft.adapt(aurora, "lora", 0.01)
    assert model.backbone.aurora is aurora  # the user's own modules, not a copy
    model.configure_optimizer(steps=2, lr=1e-2)
    model.train()
    for _ in range(2):
        loss = (model(batch).surf_vars["2t"] - target.surf_vars["2t"]).abs().mean()
        loss.backward()
        model.step(loss)
    expected = outputs(model, batch)
    folder = model.save_adapter(tmp_path / "adapter", note="own loop")
    assert json.loads((folder / "adapter.json").read_text())["note"] == "own loop"

    loaded = weatherpeft.load_adapter(folder, own_aurora())
    for key, value in outputs(loaded, batch).items():
        assert torch.equal(value, expected[key]), key

    merged = loaded.merge()
    assert type(merged) is Aurora
    assert not any("lora" in name for name, _ in merged.named_parameters())
    for key, value in outputs(merged, batch).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-5)

    with pytest.raises(weatherpeft.AdapterError, match="trained on backbone"):
        weatherpeft.load_adapter(folder, load_pretrained_tiny())  # same weights, another record


def test_the_encoder_decoder_protocol_is_carried(tmp_path):
    frozen = weatherpeft.adapt(own_aurora(), "sfas", 0.01)
    trained = weatherpeft.adapt(own_aurora(), "sfas", 0.01, encoder_decoder="train")
    assert frozen.report().encoder_decoder == 0
    assert trained.report().encoder_decoder > 0
    assert trained.adaptation.encoder_decoder == "train"
    folder = trained.save_adapter(tmp_path / "adapter")
    assert json.loads((folder / "adapter.json").read_text())["encoder_decoder"] == "train"


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="aurora.Aurora or a weatherpeft Backbone"):
        weatherpeft.adapt(torch.nn.Linear(2, 2), "lora", 0.01)
    aurora = own_aurora()
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        weatherpeft.adapt(aurora, "nope", 0.01)
    with pytest.raises(ValueError, match="has no option"):
        weatherpeft.adapt(aurora, "lora", 0.01, ranq=4)
    with pytest.raises(ValueError, match="encoder_decoder must be one of"):
        weatherpeft.adapt(aurora, "lora", 0.01, encoder_decoder="thaw")
    model = weatherpeft.adapt(aurora, "lora", 0.01)
    with pytest.raises(RuntimeError, match="configure_optimizer"):
        model.step(1.0)
    model.configure_optimizer(steps=2, on_nonfinite="skip")
    assert model.step(float("nan")) is None and model.steps_taken == 0  # the Trainer's policy
    model.configure_optimizer(steps=2)
    with pytest.raises(DivergenceError, match="training loss is nan.*your own loop"):
        model.step(float("nan"))
    with pytest.raises(ValueError, match="task's training data"):
        weatherpeft.adapt(own_aurora(), "child_tuning", 0.01).configure_optimizer(steps=1)


def test_the_example_runs_and_its_loss_falls(tmp_path):
    path = Path(__file__).resolve().parents[1] / "examples" / "own_training_loop.py"
    spec = importlib.util.spec_from_file_location("own_training_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main(["--steps", "12", "--out", str(tmp_path / "adapter")])
    assert len(losses) == 12
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4])  # the 4 batches, first pass vs third
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
