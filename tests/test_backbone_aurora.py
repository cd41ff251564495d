"""The Aurora backbone: forward, march_task repository, prompt sites, parameter roles, checkpoints,
normalisation statistics, presets. Tiny configurations only (a few seconds in all)."""

from __future__ import annotations

import dataclasses
import json
import logging

import aurora.normalisation as aurora_normalisation
import pytest
import torch
from aurora import Aurora, Batch
from aurora.model.swin3d import WindowAttention
from conftest import make_world
from safetensors.torch import load_file, save_file

from weatherpeft.backbones import AURORA_PRESETS, AuroraBackbone, Backbone
from weatherpeft.backbones.aurora import AURORA_TINY
from weatherpeft.data.stats import NormalisationStats, compute_stats
from weatherpeft.data.wb2 import SampleSpec, WB2Dataset, collate_batches

LEVELS = (500, 850)
SURF = ("2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind",
        "mean_sea_level_pressure")
PERIOD = dict(start="2001-03-01T00:00", end="2001-03-03T18:00")
#: aurora-tiny's shape at a sixteenth of the parameters: same depths, so the same 8 blocks.
SMALL = {"embed_dim": 32, "num_heads": 2, "encoder_num_heads": (2, 4),
         "decoder_num_heads": (4, 2)}


@pytest.fixture(scope="module")
def world():
    return make_world(levels=(300, 500, 850))


@pytest.fixture(scope="module")
def stats(world) -> NormalisationStats:
    """Statistics of every variable the tests use, "tp" and "w"-free (see stats_with_tp)."""
    return compute_stats(world, SampleSpec(levels=LEVELS, **PERIOD))


@pytest.fixture(scope="module")
def stats_with_tp(world) -> NormalisationStats:
    return compute_stats(world, SampleSpec(surf_vars=SURF + ("total_precipitation_6hr",),
                                           levels=LEVELS, **PERIOD))


@pytest.fixture(scope="module")
def batches(world) -> tuple[Batch, Batch]:
    """(input, target) of two samples from the real reader: batch 2, history 2, 32 × 64."""
    dataset = WB2Dataset(world, SampleSpec(levels=LEVELS, **PERIOD))
    return collate_batches([dataset[0], dataset[1]])


@pytest.fixture(scope="module")
def tiny(stats) -> AuroraBackbone:
    return AuroraBackbone("aurora-tiny", stats=stats)


def small(stats, **kwargs) -> AuroraBackbone:
    return AuroraBackbone("aurora-tiny", stats=stats, architecture=SMALL, **kwargs)


def with_surface(batch: Batch, name: str, value: torch.Tensor) -> Batch:
    return dataclasses.replace(batch, surf_vars={**batch.surf_vars, name: value})


def predictions_equal(a: Batch, b: Batch) -> bool:
    return (a.surf_vars.keys() == b.surf_vars.keys() and a.atmos_vars.keys() == b.atmos_vars.keys()
            and all(torch.equal(a.surf_vars[k], b.surf_vars[k]) for k in a.surf_vars)
            and all(torch.equal(a.atmos_vars[k], b.atmos_vars[k]) for k in a.atmos_vars))


# -- the model ------------------------------------------------------------------------------


def test_tiny_forward_predicts_every_variable_in_physical_units(tiny, batches):
    inputs, target = batches
    with torch.no_grad():
        prediction = tiny(inputs)
    assert isinstance(tiny, Backbone)
    assert set(prediction.surf_vars) == set(target.surf_vars)
    assert set(prediction.atmos_vars) == set(target.atmos_vars)
    for name, field in prediction.surf_vars.items():
        assert field.shape == target.surf_vars[name].shape == (2, 1, 32, 64)
        assert torch.isfinite(field).all()
    for name, field in prediction.atmos_vars.items():
        assert field.shape == target.atmos_vars[name].shape == (2, 1, 2, 32, 64)
    # Un-normalised with the data's statistics: an untrained model lands near the data's mean.
    mean_2t = prediction.surf_vars["2t"].mean().item()
    assert abs(mean_2t - tiny.stats.locations["2t"]) < 5 * tiny.stats.scales["2t"]
    assert prediction.metadata.time == target.metadata.time
    assert torch.equal(prediction.metadata.lat, inputs.metadata.lat)


def test_tiny_configuration(tiny):
    config = tiny.config
    assert json.loads(json.dumps(config)) == config
    assert config["preset"] == "aurora-tiny" and config["levels"] == list(LEVELS)
    assert config["architecture"]["use_lora"] is False and tiny.aurora.use_lora is False
    assert config["surf_vars"] == ["2t", "10u", "10v", "msl"]
    assert config["static_vars"] == ["lsm", "z"]
    assert sorted(config["atmos_vars"]) == sorted(["z", "t", "u", "v", "q"])
    assert 3e6 < sum(p.numel() for p in tiny.parameters()) < 1e7
    # Names are Aurora's own: the state dict is an Aurora state dict.
    assert set(tiny.state_dict()) == set(tiny.aurora.state_dict())


def test_embedding_weights_are_a_differentiable_view(tiny):
    variables = ["2t", "z", "q", "static_z", "lsm"]
    weights = tiny.embedding_weights(variables)
    assert weights.shape == (128, 5, 2 * 4 * 4)  # (D, V, history · patch²)
    surface = tiny.encoder.surf_token_embeds.weights
    atmospheric = tiny.encoder.atmos_token_embeds.weights
    expected = [surface["2t"], atmospheric["z"], atmospheric["q"], surface["z"], surface["lsm"]]
    for column, parameter in enumerate(expected):
        assert torch.equal(weights[:, column], parameter.reshape(128, -1))

    scale = torch.arange(5.0)
    (weights * scale[None, :, None]).sum().backward()
    for column, parameter in enumerate(expected):
        assert torch.equal(parameter.grad, torch.full_like(parameter, float(column)))
        parameter.grad = None
    assert surface["msl"].grad is None

    with pytest.raises(ValueError, match="no patch embedding for 'tp'"):
        tiny.embedding_weights(["tp"])
    assert set(tiny.embedding_variables) >= {"2t", "z", "static_z", "lsm"}


def test_prompt_sites_are_every_swin_attention(tiny):
    sites = tiny.prompt_sites()
    blocks = [m for m in tiny.modules() if type(m).__name__ == "Swin3DTransformerBlock"]
    assert len(sites) == len(blocks) == 8
    assert sites[0][0] == "backbone.encoder_layers.0.blocks.0.attn"
    assert sites[-1][0] == "backbone.decoder_layers.1.blocks.1.attn"
    for name, module in sites:
        assert isinstance(module, WindowAttention)
        assert tiny.get_submodule(name) is module


def test_parameter_roles_partition_and_new_variables_are_task_head(stats_with_tp):
    backbone = small(stats_with_tp, extra_surf_vars=("tp",))
    pretrained, head = backbone.pretrained_parameters(), backbone.task_head_parameters()
    everything = dict(backbone.named_parameters())
    assert set(pretrained) | set(head) == set(everything)
    assert not set(pretrained) & set(head)
    assert all(everything[n] is p for n, p in {**pretrained, **head}.items())
    assert set(head) == {"encoder.surf_token_embeds.weights.tp", "decoder.surf_heads.tp.weight",
                         "decoder.surf_heads.tp.bias"}
    assert backbone.config["task_head_surf_vars"] == ["tp"]
    assert "tp" not in backbone.config["surf_vars"]
    assert not small(stats_with_tp).task_head_parameters()


def test_new_atmospheric_variable_is_task_head_and_needs_statistics(stats, batches):
    with pytest.raises(ValueError, match=r"lack \['w_500', 'w_850'\]"):
        small(stats, extra_atmos_vars=("w",))
    extended = NormalisationStats(locations={**stats.locations, "w_500": 0.0, "w_850": 0.0},
                                  scales={**stats.scales, "w_500": 0.1, "w_850": 0.2})
    backbone = small(extended, extra_atmos_vars=("w",))
    assert set(backbone.task_head_parameters()) == {
        "encoder.atmos_token_embeds.weights.w", "decoder.atmos_heads.w.weight",
        "decoder.atmos_heads.w.bias"}
    inputs, _ = batches
    w = torch.randn_like(inputs.atmos_vars["z"]) * 0.1
    with torch.no_grad():
        prediction = backbone(dataclasses.replace(inputs, atmos_vars={**inputs.atmos_vars, "w": w}))
    assert prediction.atmos_vars["w"].shape == (2, 1, 2, 32, 64)


def test_task_head_variable_runs_through_forward_and_gets_gradients(stats_with_tp, batches):
    backbone = small(stats_with_tp, extra_surf_vars=("tp",))
    inputs, _ = batches
    tp = torch.rand_like(inputs.surf_vars["2t"]) * 1e-3
    prediction = backbone(with_surface(inputs, "tp", tp))
    assert prediction.surf_vars["tp"].shape == (2, 1, 32, 64)
    prediction.surf_vars["tp"].mean().backward()
    assert all(p.grad is not None for p in backbone.task_head_parameters().values())


# -- checkpoints and fingerprints -------------------------------------------------------------


def test_save_and_reload_give_identical_outputs_and_fingerprint(stats, batches, tmp_path):
    backbone = small(stats)
    inputs, _ = batches
    with torch.no_grad():
        expected = backbone(inputs)
    folder = backbone.save_checkpoint(tmp_path / "tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors",
                                                       "normalisation.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary folder left behind
    assert json.loads((folder / "config.json").read_text())["fingerprint"] == backbone.fingerprint()

    reloaded = AuroraBackbone.from_checkpoint(folder)  # statistics come from the folder
    assert reloaded.fingerprint() == backbone.fingerprint()
    assert reloaded.config == backbone.config
    assert reloaded.load_report.exact
    with torch.no_grad():
        assert predictions_equal(reloaded(inputs), expected)

    # Saving again replaces the folder (atomically); an unrelated folder is never replaced.
    reloaded.save_checkpoint(folder)
    assert AuroraBackbone.from_checkpoint(folder).fingerprint() == backbone.fingerprint()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="refusing"):
        backbone.save_checkpoint(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_saved_task_head_becomes_pretrained_on_reload(stats_with_tp, batches, tmp_path):
    backbone = small(stats_with_tp, extra_surf_vars=("tp",))
    folder = backbone.save_checkpoint(tmp_path / "with_tp")
    reloaded = AuroraBackbone.from_checkpoint(folder, extra_surf_vars=("tp",))
    assert "tp" in reloaded.config["surf_vars"] and not reloaded.task_head_parameters()
    inputs, _ = batches
    tp_batch = with_surface(inputs, "tp", torch.rand_like(inputs.surf_vars["2t"]) * 1e-3)
    with torch.no_grad():
        assert predictions_equal(reloaded(tp_batch), backbone(tp_batch))
    # The pretrained weights of the original are unchanged, so adding "tp" again on top of
    # the original checkpoint gives the original fingerprint (the head is not part of it).
    plain = small(stats_with_tp)
    plain_folder = plain.save_checkpoint(tmp_path / "plain")
    with_head = AuroraBackbone.from_checkpoint(plain_folder, extra_surf_vars=("tp",),
                                               stats=stats_with_tp)
    assert with_head.fingerprint() == plain.fingerprint()
    assert set(with_head.task_head_parameters()) == set(backbone.task_head_parameters())


def test_fingerprint_is_cached_and_follows_weights_on_request(stats):
    backbone = small(stats)
    before = backbone.fingerprint()
    assert len(before) == 64
    with torch.no_grad():
        backbone.backbone.encoder_layers[0].blocks[0].attn.qkv.weight[0, 0] += 1e-3
    assert backbone.fingerprint() == before  # as loaded, until asked to refresh
    assert backbone.fingerprint(refresh=True) != before
    # Runtime settings are not part of the identity: same weights, same fingerprint.
    other = small(stats, activation_checkpointing=True)
    assert other.fingerprint() != backbone.fingerprint()  # another random initialisation
    other.load_state_dict(backbone.state_dict())
    assert other.fingerprint(refresh=True) == backbone.fingerprint()


def test_wrong_variables_levels_or_shapes_are_refused_with_the_keys(stats, tmp_path):
    folder = small(stats).save_checkpoint(tmp_path / "tiny")
    without_q = {**SMALL, "atmos_vars": ("z", "u", "v", "t")}
    with pytest.raises(ValueError) as caught:
        AuroraBackbone("aurora-tiny", stats=stats, architecture=without_q, checkpoint=folder)
    message = str(caught.value)
    assert "unexpected in the checkpoint (3)" in message
    for key in ("encoder.atmos_token_embeds.weights.q", "decoder.atmos_heads.q.weight",
                "decoder.atmos_heads.q.bias"):
        assert key in message

    with pytest.raises(ValueError, match=r"levels: checkpoint \[500, 850\] vs model \[850\]"):
        AuroraBackbone("aurora-tiny", stats=stats, architecture=SMALL, checkpoint=folder,
                       levels=(850,))

    wider = {**SMALL, "embed_dim": 64}
    with pytest.raises(ValueError) as caught:
        AuroraBackbone("aurora-tiny", stats=stats, architecture=wider, checkpoint=folder)
    message = str(caught.value)
    assert "backbone.decoder_layers.0.blocks.0.attn.proj.bias (checkpoint [64] vs model [128])" \
        in message  # the decoder's first stage works at twice the embedding width
    assert "... and" in message  # long listings are cut, with the count of the rest
    assert "architecture.embed_dim: checkpoint 32 vs model 64" in message

    # A config edited by hand no longer matches the weights it sits beside.
    config = json.loads((folder / "config.json").read_text())
    config["architecture"]["embed_dim"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape differs"):
        AuroraBackbone.from_checkpoint(folder)


def test_strict_false_loads_what_fits_and_reports_the_rest(stats, tmp_path, caplog):
    source = small(stats)
    folder = source.save_checkpoint(tmp_path / "tiny")
    without_q = {**SMALL, "atmos_vars": ("z", "u", "v", "t")}
    with caplog.at_level(logging.WARNING):
        partial = AuroraBackbone("aurora-tiny", stats=stats, architecture=without_q,
                                 checkpoint=folder, strict=False)
    assert "decoder.atmos_heads.q.weight" in caplog.text
    report = partial.load_report
    assert not report.exact and len(report.unexpected) == 3 and not report.missing
    loaded = source.state_dict()
    for name, value in partial.state_dict().items():
        assert torch.equal(value, loaded[name]), name


def test_missing_files_raise_file_not_found_naming_the_path(stats, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        AuroraBackbone.from_checkpoint(tmp_path / "nowhere")
    folder = small(stats).save_checkpoint(tmp_path / "tiny")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=str(folder / "model.safetensors")):
        AuroraBackbone.from_checkpoint(folder)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        AuroraBackbone("aurora-0.25-small-pretrained", checkpoint=tmp_path / "missing.ckpt")


def test_weights_that_do_not_match_their_recorded_fingerprint_are_refused(stats, tmp_path):
    folder = small(stats).save_checkpoint(tmp_path / "tiny")
    weights = load_file(folder / "model.safetensors")
    weights["decoder.surf_heads.2t.bias"][0] += 1.0  # same keys and shapes, other values
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="modified or corrupted"):
        AuroraBackbone.from_checkpoint(folder)


def test_published_presets_never_download():
    with pytest.raises(ValueError, match="never downloads.*aurora-0.25-pretrained.ckpt.*local path"):
        AuroraBackbone("aurora-0.25-pretrained")
    with pytest.raises(ValueError, match="not a local path"):
        AuroraBackbone("aurora-0.25-finetuned", checkpoint="hf://microsoft/aurora")
    with pytest.raises(ValueError, match="unknown Aurora preset 'aurora-huge'"):
        AuroraBackbone("aurora-huge")


def test_use_lora_is_off_for_every_preset():
    """Published configurations are 1B+ parameters: build their classes with a small shape."""
    assert {"aurora-tiny", "aurora-0.25-pretrained", "aurora-0.25-small-pretrained",
            "aurora-0.25-finetuned", "aurora-0.1-finetuned"} <= set(AURORA_PRESETS)
    for name, preset in AURORA_PRESETS.items():
        assert preset.build_kwargs()["use_lora"] is False
        assert preset.build_kwargs({"use_lora": True})["use_lora"] is False
        architecture = None if name == "aurora-tiny" else {
            **SMALL, "encoder_depths": (1, 1), "decoder_depths": (1, 1)}
        stats = None
        if name == "aurora-tiny":
            keys = ["2t", "10u", "10v", "msl", "lsm", "z"] + [f"{v}_{level}" for v in "zuvtq"
                                                             for level in LEVELS]
            stats = NormalisationStats(locations=dict.fromkeys(keys, 0.0),
                                       scales=dict.fromkeys(keys, 1.0))
        backbone = AuroraBackbone(name, stats=stats, architecture=architecture, random_init=True)
        assert isinstance(backbone.aurora, preset.model_class)
        assert backbone.aurora.use_lora is False
        assert not [n for n, _ in backbone.named_parameters() if "lora" in n], name
    with pytest.raises(ValueError, match="use_lora=False"):
        AuroraBackbone("aurora-tiny", architecture={"use_lora": True})


def test_aurora_checkpoint_with_lora_is_folded_into_the_weights(tmp_path, batches):
    """Microsoft's fine-tuned checkpoints carry Aurora's LoRA; use_lora=False must keep its effect."""
    shape = {**{k: v for k, v in AURORA_TINY.items() if not k.endswith("_vars")}, **SMALL}
    reference = Aurora(use_lora=True, **shape)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "lora_B" in name or "ln_modulation" in name:
                parameter.normal_(0.0, 0.05)  # LoRA B and AdaLN start at zero: make them matter
    path = tmp_path / "finetuned.ckpt"
    torch.save({f"net.{k}": v for k, v in reference.state_dict().items()}, path)

    backbone = AuroraBackbone("aurora-0.25-finetuned", architecture=shape, checkpoint=path)
    assert backbone.aurora.use_lora is False and backbone.load_report.exact
    assert any("LoRA folded" in note for note in backbone.load_report.notes)
    inputs, _ = batches
    reference.surf_stats = dict(backbone.aurora.surf_stats)
    with torch.no_grad():
        ours = backbone(inputs)
        theirs = reference(inputs)  # same (ERA5) statistics, now installed
    for name in ours.surf_vars:
        torch.testing.assert_close(ours.surf_vars[name], theirs.surf_vars[name],
                                   rtol=0, atol=1e-5 * theirs.surf_vars[name].abs().max().item())


# -- normalisation -------------------------------------------------------------------------------


def test_missing_statistics_are_named(stats):
    with pytest.raises(ValueError, match="no normalisation statistics of its own"):
        AuroraBackbone("aurora-tiny")
    partial = NormalisationStats(
        locations={k: v for k, v in stats.locations.items() if k not in ("q_850", "lsm")},
        scales={k: v for k, v in stats.scales.items() if k not in ("q_850", "lsm")})
    with pytest.raises(ValueError, match=r"lack \['lsm', 'q_850'\]"):
        AuroraBackbone("aurora-tiny", stats=partial)
    with pytest.raises(ValueError, match=r"lack \['tp'\]"):
        small(stats, extra_surf_vars=("tp",))
    # Published weights come with Aurora's ERA5 statistics, but not for a new variable.
    with pytest.raises(ValueError, match=r"lack \['tp'\]"):
        AuroraBackbone("aurora-0.25-small-pretrained", random_init=True,
                       architecture={**SMALL, "encoder_depths": (1, 1), "decoder_depths": (1, 1)},
                       extra_surf_vars=("tp",))


def test_each_backbone_normalises_with_its_own_statistics(stats, batches):
    backbone = small(stats)
    inputs, _ = batches
    with torch.no_grad():
        alone = backbone(inputs)
    assert aurora_normalisation.scales["z_500"] == stats.scales["z_500"]
    # Another backbone with other statistics installs its own into Aurora's shared dicts ...
    shifted = NormalisationStats(locations={k: v + 1.0 for k, v in stats.locations.items()},
                                 scales={k: 2.0 * v for k, v in stats.scales.items()})
    other = small(shifted)
    assert aurora_normalisation.scales["z_500"] == shifted.scales["z_500"]
    with torch.no_grad():
        other(inputs)
        again = backbone(inputs)  # ... and the first still uses its own.
    assert predictions_equal(again, alone)


def test_overriding_pretrained_statistics_warns(stats, tmp_path):
    folder = small(stats).save_checkpoint(tmp_path / "tiny")
    shifted = NormalisationStats(locations={**stats.locations, "2t": stats.locations["2t"] + 5},
                                 scales=dict(stats.scales))
    with pytest.warns(UserWarning, match=r"override the normalisation .* \['2t'\]"):
        backbone = AuroraBackbone.from_checkpoint(folder, stats=shifted)
    assert backbone.stats.locations["2t"] == stats.locations["2t"] + 5


def test_batch_that_does_not_fit_is_refused(tiny, batches):
    inputs, _ = batches
    with pytest.raises(ValueError, match=r"surface variables \['tp'\]"):
        tiny(with_surface(inputs, "tp", inputs.surf_vars["2t"]))
    other_levels = dataclasses.replace(
        inputs, metadata=dataclasses.replace(inputs.metadata, atmos_levels=(300, 850)))
    with pytest.raises(ValueError, match=r"levels \[300\]"):
        tiny(other_levels)


def test_activation_checkpointing_changes_nothing_but_memory(stats, batches):
    plain = small(stats)
    checkpointed = small(stats, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    # Make the Swin blocks matter (AdaLN modulation is zero at initialisation).
    with torch.no_grad():
        for model in (plain, checkpointed):
            for name, parameter in model.named_parameters():
                if "ln_modulation" in name:
                    parameter.copy_(torch.linspace(-0.1, 0.1, parameter.numel()).view_as(parameter))
    inputs, _ = batches
    losses = [model(inputs).surf_vars["2t"].std() for model in (plain, checkpointed)]
    torch.testing.assert_close(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]


def test_the_forecast_does_not_depend_on_the_machine_time_zone(builtin_batches, monkeypatch):
    """Naive times are UTC: Aurora's ``datetime.timestamp()`` must not read the local zone."""
    import time

    from conftest import load_pretrained_tiny

    backbone = load_pretrained_tiny().eval()
    batch = builtin_batches[0]
    forecasts = []
    for zone in ("UTC", "America/Los_Angeles", "Asia/Tokyo"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        with torch.no_grad():
            forecasts.append(backbone(batch))
    monkeypatch.undo()
    time.tzset()
    for forecast in forecasts[1:]:
        assert forecast.metadata.time == forecasts[0].metadata.time
        assert all(t.tzinfo is None for t in forecast.metadata.time)
        for name, value in forecast.surf_vars.items():
            assert torch.equal(value, forecasts[0].surf_vars[name]), name
