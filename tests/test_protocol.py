"""The encoder/decoder protocol ("frozen" | "train"), WeatherPEFT's paper sizing and the authors'
SFAS noise: what trains, what is counted, what the adapter file holds, and what is refused."""

from __future__ import annotations

import json
import types

import pytest
import torch
from conftest import load_pretrained_tiny
from helpers import outputs

from weatherpeft.adapters import (
    CONFIG_FILE,
    TENSOR_FILE,
    _record_digest,
    adapter_tensors,
    load_adapter,
    load_merged,
    save_adapter,
    save_merged,
)
from weatherpeft.backbones.base import Backbone
from weatherpeft.finetune import FinetuneConfig
from weatherpeft.methods.base import BudgetError, budget_entries
from weatherpeft.methods.registry import apply_method
from weatherpeft.methods.sfas import FisherSelection, SFASConfig, _seed, block_noise
from weatherpeft.methods.weatherpeft import PAPER_PROMPT_LENGTHS, with_paper_prompt_length
from weatherpeft.train import TrainConfig, Trainer

#: aurora-tiny's Perceiver encoder/decoder (issue 15) and its whole pretrained count.
ENCODER_DECODER = 1_086_736
PRETRAINED = 6_138_128
#: Methods with a masked update, and the budget each method is trained at under "train"
#: (WeatherPEFT's split needs 0.33 % there: the budget's denominator shrinks).
MASKED = ("sfas", "child_tuning", "random_mask", "weatherpeft")
TRAINED = (("full", 1.0, {}), ("frozen", 1.0, {}), ("lora", 0.003, {}), ("tadp", 0.003, {}),
           ("ssf", 0.003, {}), ("sfas", 0.003, {}), ("child_tuning", 0.003, {"fisher_batches": 1}),
           ("random_mask", 0.003, {}), ("weatherpeft", 0.04, {}),
           ("weatherpeft", 0.003, {"sizing": "paper", "prompt_length": 5, "noise": "authors"}))


def coder_names(backbone) -> set[str]:
    return set(backbone.encoder_decoder_parameters())


def train(adaptation, task, tmp_path, steps=2, encoder_decoder_lr=None):
    config = TrainConfig(steps=steps, batch_size=2, lr=1e-3, log_every=0, progress=False,
                         out_dir=str(tmp_path / "run"), grad_clip=1.0)
    trainer = Trainer(adaptation, task, config, hooks=adaptation.hooks,
                      param_groups=adaptation.param_groups(config.weight_decay,
                                                           encoder_decoder_lr=encoder_decoder_lr))
    trainer.fit()
    return trainer


def snapshot(parameters) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in parameters.items()}


def moved(after, before) -> dict[str, torch.Tensor]:
    return {n: torch.nonzero(after[n].detach().reshape(-1) != before[n].reshape(-1)).reshape(-1)
            for n in before}


@pytest.mark.parametrize("method,budget,options", TRAINED,
                         ids=[f"{m}-{o.get('sizing', '')}" for m, _, o in TRAINED])
def test_train_moves_the_encoder_decoder_under_every_method_and_nothing_else_unclaimed(
        method, budget, options, march_task, tmp_path):
    backbone = load_pretrained_tiny()
    adaptation = apply_method(method, backbone, budget, options, encoder_decoder="train")
    coder = adaptation.encoder_decoder_parameters()
    swin = backbone.pretrained_parameters()
    assert set(coder) == coder_names(backbone) and not set(coder) & set(swin)
    assert all(name.startswith(("encoder.", "decoder.")) for name in coder)
    coder_before, swin_before = snapshot(coder), snapshot(swin)
    trainer = train(adaptation, march_task, tmp_path, encoder_decoder_lr=5e-4)

    # The encoder/decoder move, in their own optimizer groups at their own learning rate.
    coder_moved = moved(coder, coder_before)
    still = [n for n, idx in coder_moved.items() if not len(idx)]
    assert sum(len(i) for i in coder_moved.values()) > 0.5 * ENCODER_DECODER, still
    groups = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(groups[id(p)]["name"].startswith("encoder_decoder_") for p in coder.values())
    assert all(groups[id(p)]["initial_lr"] == 5e-4 for p in coder.values())

    # Outside them, only what the method claims moves.
    report = adaptation.report()
    swin_moved = moved(swin, swin_before)
    n_swin = sum(len(i) for i in swin_moved.values())
    if method in MASKED:
        (update,) = adaptation.masked_updates
        assert not set(update.parameters) & set(coder)  # the selection pool
        assert n_swin == update.stored_entries() > 0
        for name, indices in swin_moved.items():
            assert torch.isin(indices, update.moved_indices().get(name, torch.empty(0))).all()
    elif method == "full":
        assert n_swin > 0.5 * sum(p.numel() for p in swin.values())
    else:
        assert n_swin == 0
    assert report.encoder_decoder == ENCODER_DECODER
    assert report.pretrained == PRETRAINED - ENCODER_DECODER
    if method == "full":
        assert report.trainable == report.stored == PRETRAINED - ENCODER_DECODER
    if method == "frozen":
        assert report.trainable == report.stored == 0


def test_selection_pools_and_budgets_exclude_the_encoder_decoder_under_train_only():
    for protocol, pool_size in (("frozen", PRETRAINED), ("train", PRETRAINED - ENCODER_DECODER)):
        for method in ("sfas", "child_tuning", "random_mask"):
            backbone = load_pretrained_tiny()
            adaptation = apply_method(method, backbone, 0.04, encoder_decoder=protocol)
            (update,) = adaptation.masked_updates
            pool = sum(p.numel() for p in update.parameters.values())
            assert pool == pool_size, (protocol, method)
            assert update.per_step_entries == round(0.04 * pool_size)
            assert bool(set(update.parameters) & coder_names(backbone)) == (protocol == "frozen")
        assert budget_entries(backbone, 0.04) == round(0.04 * pool_size)


def test_frozen_is_the_default_and_changes_nothing():
    """The "frozen" protocol is what every method did before protocols existed: the counts of
    main (dbc4c64) on aurora-tiny, no encoder/decoder role, no new optimizer group."""
    expected = {"full": (PRETRAINED, PRETRAINED), "frozen": (0, 0), "lora": (18176, 18176),
                "sfas": (18414, 0), "weatherpeft": (18414, 16528)}
    for method, (trainable, stored) in expected.items():
        backbone = load_pretrained_tiny()
        backbone.set_encoder_decoder("train")  # a backbone set before is set back
        adaptation = apply_method(method, backbone, 0.003)
        report = adaptation.report()
        assert adaptation.encoder_decoder == backbone.encoder_decoder == "frozen"
        assert (report.pretrained, report.trainable, report.stored) == (PRETRAINED, trainable, stored)
        assert report.encoder_decoder == 0 and not adaptation.encoder_decoder_parameters()
        names = [g["name"] for g in adaptation.param_groups(0.05, new_lr=1e-2)] \
            if method != "frozen" else []
        assert not any(name.startswith("encoder_decoder") for name in names)
        assert not any(key.startswith("encoder_decoder.") for key in adapter_tensors(adaptation))


def test_adapter_round_trip_under_train_is_exact_and_old_files_load_as_frozen(
        march_task, builtin_batches, tmp_path):
    adaptation = apply_method("weatherpeft", load_pretrained_tiny(), 0.04, {"noise": "authors"},
                              encoder_decoder="train")
    train(adaptation, march_task, tmp_path)
    folder = save_adapter(adaptation, tmp_path / "adapter")
    record = json.loads((folder / CONFIG_FILE).read_text())
    assert record["encoder_decoder"] == "train"
    assert record["report"]["encoder_decoder"] == ENCODER_DECODER
    keys = set(record["tensors"])
    assert {f"encoder_decoder.{n}" for n in adaptation.encoder_decoder_parameters()} <= keys
    assert not any(k.startswith(("dense.encoder.", "sparse.encoder.", "sparse.decoder.")) for k in keys)
    loaded = load_adapter(folder, load_pretrained_tiny())
    assert loaded.encoder_decoder == "train" and loaded.report() == adaptation.report()
    expected, got = outputs(adaptation, builtin_batches[0]), outputs(loaded, builtin_batches[0])
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    merged = load_merged(save_merged(loaded, tmp_path / "merged"))  # the trained coder folded in
    deployed = outputs(merged, builtin_batches[0])
    assert all(torch.equal(expected[k], deployed[k]) for k in expected)

    # A file written before protocols existed (no "encoder_decoder" field) loads as "frozen".
    old = apply_method("lora", load_pretrained_tiny(), 0.003)
    folder = save_adapter(old, tmp_path / "old")
    record = json.loads((folder / CONFIG_FILE).read_text())
    del record["encoder_decoder"]
    record["record_sha256"] = _record_digest(record)
    (folder / CONFIG_FILE).write_text(json.dumps(record))
    assert load_adapter(folder, load_pretrained_tiny()).encoder_decoder == "frozen"
    # ... and a "train" file whose field was removed does not load silently as "frozen".
    record = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    del record["encoder_decoder"]
    record["record_sha256"] = _record_digest(record)
    (tmp_path / "adapter" / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="the model expects|encoder_decoder tensors"):
        load_adapter(tmp_path / "adapter", load_pretrained_tiny())
    assert (tmp_path / "adapter" / TENSOR_FILE).is_file()


def test_bad_protocols_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="encoder_decoder must be one of"):
        apply_method("lora", load_pretrained_tiny(), 0.003, encoder_decoder="trained")
    with pytest.raises(ValueError, match="encoder_decoder must be one of"):
        FinetuneConfig(encoder_decoder="both")
    backbone = load_pretrained_tiny()
    backbone._is_encoder_decoder = types.MethodType(Backbone._is_encoder_decoder, backbone)
    with pytest.raises(ValueError, match="cannot honour encoder_decoder='train'"):
        apply_method("sfas", backbone, 0.003, encoder_decoder="train")
    assert apply_method("sfas", backbone, 0.003).report().pretrained == PRETRAINED


def test_prithvi_names_its_embeddings_and_unembedding():
    from test_backbone_prithvi import STATS

    from weatherpeft.backbones import PrithviBackbone
    from weatherpeft.data.stats import NormalisationStats

    backbone = PrithviBackbone("prithvi-tiny", stats=NormalisationStats.load(STATS))
    names = coder_names(backbone)
    assert {n.split(".")[1] for n in names} == {"patch_embedding", "patch_embedding_static",
                                                "input_time_embedding", "lead_time_embedding",
                                                "unembed"}
    total = sum(p.numel() for p in backbone.pretrained_parameters().values())
    adaptation = apply_method("lora", backbone, 0.003, encoder_decoder="train")
    size = sum(p.numel() for p in backbone.encoder_decoder_parameters().values())
    assert adaptation.report().encoder_decoder == size
    assert adaptation.report().pretrained == total - size
    assert all(p.requires_grad for p in adaptation.encoder_decoder_parameters().values())


def test_paper_sizing_keeps_the_whole_budget_for_sfas_and_adds_tadp_on_top():
    split = apply_method("weatherpeft", load_pretrained_tiny(), 0.04)
    paper = apply_method("weatherpeft", load_pretrained_tiny(), 0.04, {"sizing": "paper",
                                                                       "prompt_length": 20})
    entries = budget_entries(paper.backbone, 0.04)
    (sfas,) = paper.masked_updates
    assert sfas.per_step_entries == entries == paper.resolved["sfas_entries"]
    tadp = paper.resolved["tadp_parameters"]
    assert paper.resolved["tadp"] == {"prompt_length": 20, "sharing": "block", "width_map": "interpolate"}
    assert paper.report().trainable == entries + tadp > 1.1 * entries  # the report states the total
    assert f"{entries + tadp:,} trainable" in paper.resolved["over_budget"]
    assert split.report().trainable == entries and split.resolved["sizing"] == "split"
    assert with_paper_prompt_length("weatherpeft", {"sizing": "paper"}, "postprocessing") == \
        {"sizing": "paper", "prompt_length": PAPER_PROMPT_LENGTHS["postprocessing"]}
    assert with_paper_prompt_length("weatherpeft", {}, "postprocessing") == {}
    for variant, task in (("downscaling-x2", "downscaling"), ("precipitation-rollout", "precipitation")):
        assert with_paper_prompt_length("weatherpeft", {"sizing": "paper"}, variant)["prompt_length"] \
            == PAPER_PROMPT_LENGTHS[task]
    assert with_paper_prompt_length("weatherpeft", {"sizing": "paper", "prompt_length": 7},
                                    "downscaling")["prompt_length"] == 7
    five = apply_method("weatherpeft", load_pretrained_tiny(), 0.003,
                        with_paper_prompt_length("weatherpeft", {"sizing": "paper"}, "postprocessing"))
    assert five.resolved["tadp"]["prompt_length"] == 5
    with pytest.raises(ValueError, match="sizing must be one of"):
        apply_method("weatherpeft", load_pretrained_tiny(), 0.04, {"sizing": "equal"})
    with pytest.raises(BudgetError, match="only .* are selectable"):
        apply_method("weatherpeft", load_pretrained_tiny(), 0.5,
                     {"sizing": "paper", "include": ["backbone.encoder_layers.0"]})


def test_interpolated_width_maps_have_no_parameters_and_fit_every_site():
    from weatherpeft.methods.prompts import site_width
    from weatherpeft.methods.tadp import TADP, TADPConfig, tadp_parameter_count

    backbone = load_pretrained_tiny()
    variables = backbone.embedding_variables
    config = TADPConfig(prompt_length=5, width_map="interpolate")
    tadp = TADP(backbone, variables, config)
    assert sum(p.numel() for p in tadp.parameters()) == tadp_parameter_count(backbone, len(variables), config)
    assert not any(p.numel() for p in tadp.projections.parameters()) and len(tadp.projections)
    widths = {name: site_width(name, module) for name, module in backbone.prompt_sites()}
    assert {site: tuple(p.shape) for site, p in tadp.prompts().items()} == \
        {site: (5, width) for site, width in widths.items()}


def test_authors_noise_ranks_by_gradient_magnitude_times_uniform_noise():
    torch.manual_seed(0)
    parameters = {"a": torch.nn.Parameter(torch.zeros(300)), "b": torch.nn.Parameter(torch.zeros(20, 10))}
    grads = {n: torch.randn_like(p) for n, p in parameters.items()}
    selections = []
    for gamma in (0.2, 5.0):
        selection = FisherSelection(parameters, 50, SFASConfig(noise="authors", gamma=gamma, seed=3))
        selection.total_steps = 10
        for name, parameter in parameters.items():
            parameter.grad = grads[name].clone()
        selection.update_selection(None, step=9)  # the last step: still noisy, never annealed
        selections.append(selection.selection)
    scores = torch.cat([grads[n].reshape(-1).abs() *
                        (block_noise(_seed(3, 9, i, 0), p.numel(), 0, p.numel()).float() + 2**15 + 0.5)
                        for i, (n, p) in enumerate(parameters.items())])
    top = torch.topk(scores, 50).indices.sort().values
    chosen = torch.cat([selections[0]["a"], selections[0]["b"] + 300])
    assert torch.equal(chosen, top)
    assert all(torch.equal(selections[0][n], selections[1][n]) for n in parameters)  # γ: no effect
    pure = torch.topk(torch.cat([g.reshape(-1).abs() for g in grads.values()]), 50).indices.sort().values
    assert not torch.equal(chosen, pure)
    with pytest.raises(ValueError, match="noise must be one of"):
        SFASConfig(noise="authorz")


def test_cli_and_yaml_take_the_protocol(tmp_path, capsys):
    from weatherpeft.cli import build_parser, main
    from weatherpeft.config import build_config

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--encoder-decoder {frozen,train}" in text and "'train': the paper's protocol" in text
    assert "--encoder-decoder-lr" in text
    yaml = tmp_path / "run.yaml"
    yaml.write_text("encoder_decoder: train\nencoder_decoder_lr: 0.0005\nmethod: lora\n")
    args = build_parser().parse_args(["finetune", "--config", str(yaml)])
    config = build_config(FinetuneConfig, args, shared_keys=("steps",))
    assert (config.encoder_decoder, config.encoder_decoder_lr) == ("train", 5e-4)
    yaml.write_text("encoder_decoder: thawed\n")
    with pytest.raises(ValueError, match="encoder_decoder must be one of"):
        build_config(FinetuneConfig, build_parser().parse_args(["finetune", "--config", str(yaml)]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["benchmark", "--encoder-decoder", "frozen", "thawed"])
