"""Prithvi-WxC behind the Backbone contract, on the CPU-sized prithvi-tiny (random weights).

prithvi-tiny: 14 channels (4 surface + 5 atmospheric × 500/850 hPa), 2 input times, patch 2
on the 32 × 64 grid, mask units 8 × 16 px (16 units of 4 × 8 = 32 patches), D = 128, 10
transformers (encoder and decoder: local, global, local, global, local).
Prithvi does not zero-initialise its blocks, so a random model is not the identity and every
comparison below can fail.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import load_pretrained_tiny

from weatherpeft.adapters import AdapterError, adapter_info, load_adapter, save_adapter
from weatherpeft.backbones import load_backbone
from weatherpeft.backbones.prithvi import MERRA2_LEVELS, PRITHVI_PRESETS, PrithviBackbone, channel_names
from weatherpeft.data.builtin import store_path
from weatherpeft.data.stats import NormalisationStats
from weatherpeft.data.wb2 import SampleSpec, WB2Dataset, collate_batches
from weatherpeft.methods.hf_peft import target_modules
from weatherpeft.methods.prompts import PromptInjector
from weatherpeft.methods.registry import apply_method, method_names
from weatherpeft.train import TrainConfig, Trainer

STATS = Path(__file__).resolve().parents[1] / "data" / "builtin" / "normalisation.json"
CHANNELS = ("2t", "10u", "10v", "msl", "z_500", "z_850", "u_500", "u_850", "v_500", "v_850",
            "t_500", "t_850", "q_500", "q_850")
LOCAL, GLOBAL = (2, 16, 32, 128), (2, 32, 16, 128)  # a site's tokens (B, ·, ·, D)
SITE_TOKENS = (LOCAL, GLOBAL, LOCAL, GLOBAL, LOCAL) * 2


def stats() -> NormalisationStats:
    return NormalisationStats.load(STATS)


def tiny(seed: int = 0, **kwargs) -> PrithviBackbone:
    """A fresh prithvi-tiny with seeded random weights (same seed, same weights)."""
    torch.manual_seed(seed)
    return PrithviBackbone("prithvi-tiny", stats=kwargs.pop("stats", None) or stats(), **kwargs)


def frozen(**kwargs) -> PrithviBackbone:
    backbone = tiny(**kwargs).eval()
    backbone.requires_grad_(False)
    return backbone


def fields(batch) -> dict[str, torch.Tensor]:
    return {**batch.surf_vars, **batch.atmos_vars}


@pytest.fixture(scope="module")
def tp_batches():
    """(input, target) of two built-in samples that also carry total precipitation ("tp")."""
    spec = SampleSpec(start="2003-03-01", end="2003-03-03",
                      surf_vars=SampleSpec().surf_vars + ("total_precipitation_6hr",))
    dataset = WB2Dataset(store_path("downstream"), spec)
    return collate_batches([dataset[0], dataset[1]])


def loss_of(prediction, target) -> torch.Tensor:
    scales = stats().scales
    total = sum(((prediction.surf_vars[k] - target.surf_vars[k]) / scales[k]).square().mean()
                for k in prediction.surf_vars)
    return total + sum(((prediction.atmos_vars[k] - target.atmos_vars[k])).square().mean() /
                       scales[f"{k}_500"] ** 2 for k in prediction.atmos_vars)


# -- the mapping --------------------------------------------------------------------------------


def test_forward_predicts_every_variable_at_the_lead_time_and_backward_reaches_the_weights(
        builtin_batches):
    backbone = tiny()
    inputs, target = builtin_batches
    prediction = backbone(inputs)
    assert set(prediction.surf_vars) == set(inputs.surf_vars)
    assert set(prediction.atmos_vars) == set(inputs.atmos_vars)
    assert prediction.surf_vars["2t"].shape == (2, 1, 32, 64)
    assert prediction.atmos_vars["z"].shape == (2, 1, 2, 32, 64)
    assert prediction.metadata.time == tuple(t + timedelta(hours=6) for t in inputs.metadata.time)
    assert prediction.metadata.time == target.metadata.time
    assert prediction.metadata.atmos_levels == (500, 850)
    loss_of(prediction, target).backward()
    without = [n for n, p in backbone.named_parameters() if p.grad is None or not p.grad.any()]
    assert without == ["prithvi.mask_token"]  # nothing is masked in weatherpeft's forward


def test_the_channel_layout_maps_in_and_out(builtin_batches):
    """With the output layer zeroed, the temporal residual returns the last input: every
    variable and level comes back where it went in."""
    backbone = frozen()
    inputs, _ = builtin_batches
    prepared = backbone._prepare(inputs)
    assert backbone.channels == CHANNELS
    assert torch.equal(prepared["x"][:, :, CHANNELS.index("z_850")], inputs.atmos_vars["z"][:, :, 1])
    assert torch.equal(prepared["x"][:, :, CHANNELS.index("msl")], inputs.surf_vars["msl"])
    static = prepared["static"]  # lat, lon (radians), 4 time channels, lsm, z
    assert static.shape == (2, 8, 32, 64)
    torch.testing.assert_close(static[0, 0, :, 0], torch.deg2rad(inputs.metadata.lat))
    assert torch.equal(static[0, 6], inputs.static_vars["lsm"])
    hour = inputs.metadata.time[1].hour  # the second sample is 6 h later than the first
    torch.testing.assert_close(static[1, 4:6, 0, 0], torch.tensor([
        torch.cos(torch.tensor(2 * torch.pi * hour / 24)), torch.sin(torch.tensor(2 * torch.pi * hour / 24))]))
    assert float(prepared["climate"][0, CHANNELS.index("t_850"), 3, 3]) == pytest.approx(
        stats().locations["t_850"], rel=1e-6)
    model = backbone.prithvi
    assert torch.equal(model.input_scalers_mu.reshape(-1),
                       torch.tensor([stats().locations[c] for c in CHANNELS]))
    with torch.no_grad():
        model.unembed.weight.zero_()
        model.unembed.bias.zero_()
        prediction = backbone(inputs)
    for name, value in fields(prediction).items():
        assert torch.equal(value[:, 0], fields(inputs)[name][:, -1]), name


def test_bad_batches_are_named(builtin_batches):
    backbone = frozen()
    inputs, _ = builtin_batches
    with pytest.raises(ValueError, match=r"surface variables \['10u'\] missing"):
        backbone(inputs.__class__(surf_vars={k: v for k, v in inputs.surf_vars.items() if k != "10u"},
                                  static_vars=inputs.static_vars, atmos_vars=inputs.atmos_vars,
                                  metadata=inputs.metadata))
    with pytest.raises(ValueError, match=r"grid 16 × 64 \(Prithvi is built for 32 × 64\)"):
        backbone(_rows(inputs, 16))


def _rows(batch, rows):
    from weatherpeft.tasks.scoring import crop_rows

    return crop_rows(batch, rows)


# -- the contract -------------------------------------------------------------------------------


def test_roles_fingerprint_and_embedding_weights():
    backbone = tiny()
    pretrained = backbone.pretrained_parameters()
    assert set(pretrained) == {n for n, _ in backbone.named_parameters()}
    assert not backbone.task_head_parameters()
    assert backbone.fingerprint() == tiny().fingerprint()
    assert backbone.fingerprint() != tiny(seed=1).fingerprint()
    assert tiny(lead_time=0).fingerprint() == backbone.fingerprint()  # a runtime setting

    assert backbone.embedding_variables == CHANNELS
    weights = backbone.embedding_weights(["z_850", "2t"])
    assert weights.shape == (128, 2, 2 * 2 * 2)  # (D, V, T·P·P)
    proj = backbone.prithvi.patch_embedding.proj.weight  # (D, T·C, P, P), time-major
    index = CHANNELS.index("z_850")
    assert torch.equal(weights[:, 0], torch.cat([proj[:, index].reshape(128, -1),
                                                 proj[:, 14 + index].reshape(128, -1)], dim=1))
    weights.square().sum().backward()
    assert proj.grad[:, index].any() and proj.grad[:, 14 + index].any()
    assert not proj.grad[:, CHANNELS.index("u_500")].any()
    with pytest.raises(ValueError, match="no patch embedding"):
        backbone.embedding_weights(["lsm"])

    names = [name for name, _ in backbone.prompt_sites()]
    assert names[0] == "prithvi.encoder.lgl_block.transformers.0.attention.1"
    assert names[-1] == "prithvi.decoder.lgl_block.transformers.4.attention.1"
    assert len(names) == 10
    lora = target_modules(backbone, backbone.linear_targets())
    assert len(lora) == 40 and {n.split(".", 5)[-1] for n in lora} == {
        "attention.1.qkv_layer", "attention.1.w_layer", "ff.1.net.0", "ff.1.net.3"}


def test_new_variables_are_task_heads_and_a_saved_model_has_them_as_channels(tp_batches, tmp_path):
    backbone = tiny(extra_surf_vars=("tp",)).eval()
    inputs, target = tp_batches
    assert set(backbone.task_head_parameters()) == {"head_embedding.weight", "head_unembed.weight",
                                                    "head_unembed.bias"}
    assert backbone.fingerprint() == tiny().fingerprint()  # heads are not the pretrained model
    assert backbone.embedding_weights(["tp"]).shape == (128, 1, 8)
    with torch.no_grad():
        before = fields(backbone(inputs))
    assert before["tp"].shape == (2, 1, 32, 64)

    backbone.save_checkpoint(tmp_path / "saved")
    loaded = load_backbone(tmp_path / "saved").eval()
    assert loaded.channels == ("2t", "10u", "10v", "msl", "tp") + CHANNELS[4:]
    assert not loaded.task_head_parameters()
    with torch.no_grad():
        after = fields(loaded(inputs))
    for name in before:  # the same function; only the conv's summation order differs
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-5 * before[name].abs().max())
    again = PrithviBackbone.from_checkpoint(tmp_path / "saved", extra_surf_vars=("tp",))
    assert not again.task_head_parameters() and again.fingerprint() == loaded.fingerprint()


# -- every method --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", method_names())
def test_every_method_runs_forward_and_backward(method, tp_batches):
    options = {"peft_type": "ia3"} if method == "peft" else {}
    adaptation = apply_method(method, tiny(extra_surf_vars=("tp",)), 0.02, options)
    inputs, target = tp_batches
    loss = loss_of(adaptation(inputs), target)
    loss.backward()
    assert torch.isfinite(loss)
    trained = [n for n, p in adaptation.named_parameters() if p.grad is not None and p.grad.any()]
    heads = [n for n in trained if ".head_" in f".{n}"]
    assert heads, "the task head got no gradient"
    if method not in ("frozen",):
        assert len(trained) > len(heads), f"{method}: nothing but the head got a gradient"


def test_ssf_merge_into_prithvis_bias_free_projections_fails_clearly():
    adaptation = apply_method("ssf", tiny(), 0.004, {"sites": (r"qkv_layer$",)})
    with pytest.raises(ValueError, match="Linear without bias"):
        adaptation.parts["ssf"].merge()


# -- prompts --------------------------------------------------------------------------------------


def random_prompts(backbone, length: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(length, 128, generator=generator) for name, _ in backbone.prompt_sites()}


def test_prompts_reach_every_site_local_and_global(builtin_batches):
    backbone = frozen()
    inputs, _ = builtin_batches
    prompts = random_prompts(backbone)
    with torch.no_grad():
        plain = fields(backbone(inputs))
        seen = {}
        injector = PromptInjector(backbone, lambda: prompts).attach()

        def record(name, module, args):
            seen.setdefault(name, tuple(args[0][0].shape))

        handles = [site.register_forward_pre_hook(functools.partial(record, name))
                   for name, site in backbone.prompt_sites()]
        prompted = fields(backbone(inputs))
        for handle in handles:
            handle.remove()
        injector.detach()
        for name, _ in backbone.prompt_sites():  # each site alone changes the output
            one = PromptInjector(backbone, lambda name=name: {name: prompts[name]}).attach()
            alone = fields(backbone(inputs))["2t"]
            one.detach()
            assert not torch.allclose(alone, plain["2t"], atol=1e-3), name
        invisible = PromptInjector(backbone, lambda: prompts, key_bias=float("-inf")).attach()
        hidden = fields(backbone(inputs))
        invisible.detach()
        restored = fields(backbone(inputs))
    # P = 4 prompts join every mask unit (local) and every across-unit sequence (global)
    for (name, _), (b, n, length, d) in zip(backbone.prompt_sites(), SITE_TOKENS):
        assert seen[name] == (b, n, length + 4, d), name
    for key in plain:
        scale = plain[key].abs().max()
        assert (prompted[key] - plain[key]).abs().max() >= 1e-4 * scale, key
        assert (hidden[key] - plain[key]).abs().max() <= 2e-6 * scale, key
        assert torch.equal(restored[key], plain[key]), key
    assert all("forward" not in vars(site) for _, site in backbone.prompt_sites())


def test_tadp_generates_prompts_for_prithvi_in_every_sharing_mode():
    for sharing, generators in (("block", 10), ("stage", 2), ("all", 1)):
        adaptation = apply_method("tadp", tiny(), 0.04, {"sharing": sharing, "prompt_length": 8,
                                                         "min_prompt_length": 8})
        tadp = adaptation.parts["tadp"]
        assert len(tadp.generators) == generators
        assert {tuple(p.shape) for p in tadp.prompts().values()} == {(8, 128)}


# -- SFAS and adapters ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sfas_run(march_task, tmp_path_factory):
    """prithvi-tiny (march_task's statistics) after 3 SFAS steps, and its pretrained weights before."""
    backbone = tiny(stats=march_task.stats)
    before = {n: p.detach().clone() for n, p in backbone.pretrained_parameters().items()}
    adaptation = apply_method("sfas", backbone, 0.003)
    config = TrainConfig(steps=3, batch_size=2, lr=1e-3, log_every=0, progress=False,
                         out_dir=str(tmp_path_factory.mktemp("sfas") / "run"))
    Trainer(adaptation, march_task, config, hooks=adaptation.hooks,
            param_groups=adaptation.param_groups(config.weight_decay)).fit()
    return adaptation, before


def test_sfas_moves_selected_entries_only(sfas_run):
    adaptation, before = sfas_run
    (selection,) = adaptation.masked_updates
    moved = selection.moved_indices()
    changed = 0
    for name, parameter in adaptation.backbone.pretrained_parameters().items():
        indices = torch.nonzero(parameter.detach().reshape(-1) != before[name].reshape(-1)).reshape(-1)
        assert torch.equal(indices, moved.get(name, torch.empty(0, dtype=torch.long))), name
        changed += len(indices)
    assert changed > 0 and adaptation.report().stored == changed


def test_adapter_files_record_the_backbone_and_refuse_another(sfas_run, march_task, builtin_batches,
                                                              tmp_path):
    adaptation, _ = sfas_run
    folder = save_adapter(adaptation.eval(), tmp_path / "adapter")
    assert adapter_info(folder)["backbone_preset"] == "prithvi-tiny"
    loaded = load_adapter(folder, tiny(stats=march_task.stats)).eval()
    inputs, _ = builtin_batches
    with torch.no_grad():
        expected, got = fields(adaptation(inputs)), fields(loaded(inputs))
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    with pytest.raises(AdapterError, match="prithvi-tiny"):
        load_adapter(folder, tiny(seed=1, stats=march_task.stats))
    with pytest.raises(AdapterError):
        load_adapter(folder, load_pretrained_tiny())


# -- presets and published weights --------------------------------------------------------------


def merra2_stats() -> NormalisationStats:
    preset = PRITHVI_PRESETS["prithvi-wxc-600m-rollout"]
    keys = channel_names(preset.surf_vars, preset.atmos_vars, MERRA2_LEVELS) + list(preset.static_vars)
    return NormalisationStats(locations={k: float(i) for i, k in enumerate(keys)},
                              scales={k: 1.0 + i / 100 for i, k in enumerate(keys)})


#: A published architecture shrunk to CPU size (published grid 360 × 576, here 60 × 64).
SMALL = dict(n_lats_px=60, n_lons_px=64, mask_unit_size_px=(30, 32), embed_dim=32, n_heads=2,
             n_blocks_encoder=1, n_blocks_decoder=2)


def test_published_weights_load_strictly_and_only_on_their_grid(tmp_path):
    preset = "prithvi-wxc-600m-rollout"
    with pytest.raises(ValueError, match="never downloads"):
        PrithviBackbone(preset)
    with pytest.raises(ValueError, match="even n_blocks_decoder"):  # else the output is rolled
        PrithviBackbone(preset, stats=merra2_stats(), random_init=True,
                        architecture={**SMALL, "n_blocks_decoder": 1})
    torch.manual_seed(0)
    published = PrithviBackbone(preset, stats=merra2_stats(), architecture=SMALL, random_init=True,
                                output_scales={"T_72": 0.5})
    path = tmp_path / "prithvi.wxc.rollout.600m.v1.pt"
    torch.save({"model_state": published.prithvi.state_dict()}, path)

    loaded = PrithviBackbone(preset, checkpoint=path, architecture=SMALL)
    assert loaded.load_report.exact
    assert loaded.stats.locations["T_72"] == merra2_stats().locations["T_72"]  # from its buffers
    assert loaded.config["output_scales"]["T_72"] == 0.5
    for (name, value), (_, reference) in zip(loaded.prithvi.state_dict().items(),
                                             published.prithvi.state_dict().items()):
        assert torch.equal(value, reference), name

    (tmp_path / "config.yaml").write_text("params:\n" + "".join(
        f"  {k}: {list(v) if isinstance(v, tuple) else v}\n" for k, v in SMALL.items()))
    assert PrithviBackbone(preset, checkpoint=path).fingerprint() == loaded.fingerprint()

    with pytest.raises(ValueError, match=r"(?s)decoder_shifter\.local_mask.*only on the grid"):
        PrithviBackbone(preset, checkpoint=path, architecture={**SMALL, "n_lats_px": 90})


# -- the shipped pretrained model ---------------------------------------------------------------

PRETRAINED = Path(__file__).resolve().parents[1] / "models" / "prithvi-tiny"


@pytest.mark.skipif(not (PRETRAINED / "model.safetensors").is_file(),
                    reason="models/prithvi-tiny is not there")
def test_the_pretrained_prithvi_tiny_loads_exactly_and_beats_persistence(builtin_batches):
    backbone = load_backbone(PRETRAINED).eval()
    assert backbone.load_report.exact and backbone.config["preset"] == "prithvi-tiny"
    inputs, target = builtin_batches
    with torch.no_grad():
        prediction = backbone(inputs)
    for name in ("2t", "msl", "z"):
        truth = fields(target)[name][:, -1]
        model = (fields(prediction)[name][:, -1] - truth).square().mean()
        persistence = (fields(inputs)[name][:, -1] - truth).square().mean()
        assert model < 0.8 * persistence, name
