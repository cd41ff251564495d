"""TADP and the prompt injector on the pretrained aurora-tiny (whose blocks are not the identity).

aurora-tiny: D = 128, S = 32 (history 2 × patch 4×4), 8 prompt sites (4 of them shifted-window
blocks with a mask), widths 128, 128, 256, 256 (encoder) and 256, 256, 128, 128 (decoder).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from conftest import load_pretrained_tiny

from weatherpeft.data.stats import NormalisationStats
from weatherpeft.methods.prompts import PromptInjector
from weatherpeft.methods.registry import apply_method
from weatherpeft.methods.tadp import (
    TADP,
    PromptGenerator,
    TADPConfig,
    fit_tadp_config,
    tadp_parameter_count,
)

VARIABLES = ("2t", "msl", "z")
WIDTHS = (128, 128, 256, 256, 256, 256, 128, 128)


def frozen_tiny(**kwargs):
    """The pretrained aurora-tiny in eval mode with every parameter frozen."""
    backbone = load_pretrained_tiny(**kwargs).eval()
    backbone.requires_grad_(False)
    return backbone


def outputs(batch) -> list[torch.Tensor]:
    return [*batch.surf_vars.values(), *batch.atmos_vars.values()]


def random_prompts(backbone, length: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(length, width, generator=generator)
            for (name, _), width in zip(backbone.prompt_sites(), WIDTHS)}


class CountingSource:
    """A prompt source that counts its calls."""

    def __init__(self, source: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.source, self.calls = source, 0

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return self.source()


def loss_of(backbone, batches) -> torch.Tensor:
    inputs, target = batches
    prediction = backbone(inputs)
    return ((prediction.surf_vars["2t"] - target.surf_vars["2t"]) ** 2).mean()


# -- the injector ---------------------------------------------------------------------------


def test_invisible_prompts_change_nothing_visible_ones_do_and_detach_restores(builtin_batches):
    backbone = frozen_tiny()
    inputs, _ = builtin_batches
    names = sorted(backbone.state_dict())
    with torch.no_grad():
        plain = outputs(backbone(inputs))
        invisible = PromptInjector(backbone, lambda: random_prompts(backbone),
                                   key_bias=float("-inf")).attach()
        hidden = outputs(backbone(inputs))
        assert sorted(backbone.state_dict()) == names
        invisible.detach()
        visible = PromptInjector(backbone, lambda: random_prompts(backbone)).attach()
        prompted = outputs(backbone(inputs))
        visible.detach()
        restored = outputs(backbone(inputs))
    for reference, masked, changed, after in zip(plain, hidden, prompted, restored):
        scale = reference.abs().max()
        # Invisible prompts change only the summation order inside attention (measured
        # ≤ 5e-7 of the field's largest value); visible ones change it by ≥ 2e-4.
        assert (masked - reference).abs().max() <= 2e-6 * scale
        assert (changed - reference).abs().max() >= 1e-4 * scale
        assert torch.equal(after, reference)


def test_prompts_hidden_gives_the_unprompted_model_and_then_the_prompts_back(builtin_batches):
    inputs, _ = builtin_batches
    with torch.no_grad():
        plain = outputs(frozen_tiny()(inputs))
        adaptation = apply_method("tadp", frozen_tiny(), 0.01).eval()
        for parameter in adaptation.parts.parameters():  # prompts that visibly change the output
            parameter.add_(0.5 * torch.randn_like(parameter))
        prompted = outputs(adaptation(inputs))
        with adaptation.prompts_hidden() as bare:
            hidden = outputs(bare(inputs))
        again = outputs(adaptation(inputs))
    for reference, without, with_prompts, after in zip(plain, hidden, prompted, again):
        assert torch.equal(without, reference)
        assert (with_prompts - reference).abs().max() >= 1e-4 * reference.abs().max()
        assert torch.equal(after, with_prompts)


@pytest.mark.parametrize("key_bias", [0.0, float("-inf")])
def test_site_called_with_positional_or_keyword_arguments(key_bias):
    backbone = frozen_tiny()
    name, site = backbone.prompt_sites()[1]  # a shifted-window block of encoder stage 1
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, 128, generator=generator)
    mask = torch.where(torch.rand(4, 64, 64, generator=generator) > 0.7, -100.0, 0.0)
    with torch.no_grad():
        plain = site(x, mask)
        injector = PromptInjector(backbone, lambda: {name: torch.randn(3, 128)},
                                  key_bias=key_bias).attach()
        positional, keyword = site(x, mask), site(x=x, mask=mask)
        no_mask = site(x)
        injector.detach()
        plain_no_mask = site(x)
    assert positional.shape == keyword.shape == x.shape
    if key_bias == 0.0:
        torch.testing.assert_close(positional, keyword)  # both use the prompts cached by the first
        assert not torch.allclose(positional, plain, atol=1e-3)
    else:
        torch.testing.assert_close(positional, plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(keyword, plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(no_mask, plain_no_mask, rtol=1e-5, atol=1e-6)


def test_injector_rejects_bad_prompts_and_double_attach(builtin_batches):
    backbone = frozen_tiny()
    inputs, _ = builtin_batches
    with pytest.raises(ValueError, match="key_bias"):
        PromptInjector(backbone, dict, key_bias=float("nan"))
    wrong_width = PromptInjector(backbone, lambda: {backbone.prompt_sites()[2][0]:
                                                    torch.zeros(4, 128)}).attach()
    with pytest.raises(RuntimeError, match="already attached"):
        wrong_width.attach()
    with torch.no_grad(), pytest.raises(ValueError, match=r"encoder_layers\.1\.blocks\.0.*256"):
        backbone(inputs)
    wrong_width.detach()
    unknown = PromptInjector(backbone, lambda: {"backbone.nowhere": torch.zeros(4, 128)}).attach()
    with torch.no_grad(), pytest.raises(ValueError, match="backbone.nowhere"):
        backbone(inputs)
    unknown.detach()


def test_prompts_computed_once_per_training_forward_and_cached_at_inference(builtin_batches):
    backbone = frozen_tiny()
    inputs, _ = builtin_batches
    prompts = random_prompts(backbone)
    source = CountingSource(lambda: prompts)
    injector = PromptInjector(backbone, source).attach()

    backbone.train()
    for _ in range(2):
        backbone(inputs)
    assert source.calls == 2  # once per forward, not once per site (8) or window

    backbone.eval()
    with torch.no_grad():
        for _ in range(3):
            backbone(inputs)
        assert source.calls == 3  # cached across inference forwards
        injector.invalidate()
        backbone(inputs)
        assert source.calls == 4
    backbone(inputs)  # eval with gradients: not inference, recomputed
    assert source.calls == 5

    backbone.train()
    backbone(inputs)
    assert source.calls == 6
    backbone.eval()
    with torch.no_grad():
        backbone(inputs)
        backbone(inputs)
    assert source.calls == 7  # back from training: computed once, then cached again
    injector.detach()


# -- the generator and TADP -----------------------------------------------------------------


def test_config_validation():
    for field, value in (("prompt_length", 0), ("s_bottleneck", -1), ("d_bottleneck", 2.5),
                         ("sharing", "layer"), ("v_ratio", 0.0), ("v_ratio", float("nan")),
                         ("prompt_length", True)):
        with pytest.raises(ValueError, match=field):
            TADPConfig(**{field: value})
    assert TADPConfig(v_ratio=0.5).v_bottleneck(11) == 6
    assert TADPConfig(v_ratio=0.1).v_bottleneck(1) == 1


@pytest.mark.parametrize("n_variables", [1, 3, 11])
def test_generator_starts_with_identity_adapters_and_gives_p_tokens(n_variables):
    torch.manual_seed(0)
    generator = PromptGenerator(128, n_variables, 32, 7, TADPConfig())
    embeddings = torch.randn(128, n_variables, 32)
    internal = generator.internal_mode(embeddings)
    assert torch.equal(internal, embeddings.permute(1, 2, 0).reshape(-1, 128))
    prompts = generator(embeddings)
    assert prompts.shape == (7, 128) and torch.isfinite(prompts).all()
    with pytest.raises(ValueError, match=r"\(D, V, S\)"):
        generator(torch.randn(128, n_variables + 1, 32))


def test_prompts_follow_the_variables_and_the_live_embeddings():
    backbone = frozen_tiny()
    torch.manual_seed(0)
    tadp = TADP(backbone, VARIABLES)
    prompts = tadp.prompts()
    assert list(prompts) == [name for name, _ in backbone.prompt_sites()]
    assert [p.shape for p in prompts.values()] == [(30, width) for width in WIDTHS]

    other = TADP(backbone, ("2t", "msl", "u"))  # same V, so the same weights fit
    other.load_state_dict(tadp.state_dict())
    for mine, theirs in zip(prompts.values(), other.prompts().values()):
        assert not torch.allclose(mine, theirs)

    four = TADP(backbone, (*VARIABLES, "u"))  # any V builds
    assert [p.shape for p in four.prompts().values()] == [(30, width) for width in WIDTHS]

    with torch.no_grad():
        backbone.encoder.atmos_token_embeds.weights["z"].mul_(1.5)
    for before, after in zip(prompts.values(), tadp.prompts().values()):
        assert not torch.allclose(before, after)


def test_a_new_variable_shapes_the_prompts_and_its_embedding_gets_gradients():
    backbone = frozen_tiny(extra_surf_vars=("tp",),
                           stats=NormalisationStats({"tp": 0.0}, {"tp": 1e-3}))
    embedding = backbone.task_head_parameters()["encoder.surf_token_embeds.weights.tp"]
    embedding.requires_grad_(True)
    tadp = TADP(backbone, ("2t", "tp"), TADPConfig(prompt_length=4))
    sum(p.square().sum() for p in tadp.prompts().values()).backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0


def test_gradients_reach_every_generator_parameter(builtin_batches):
    """At init the Up projections are zero, so everything upstream of them (adapter LayerNorm
    and Down) gets exactly zero gradient; the Up layers, the external LayerNorm, the V·S → P
    map and the width projections get nonzero ones. After one step on Up, all do."""
    backbone = frozen_tiny().train()
    torch.manual_seed(0)
    tadp = TADP(backbone, VARIABLES, TADPConfig(prompt_length=6)).attach()
    loss_of(backbone, builtin_batches).backward()
    upstream_of_up = (".norm.", ".down.")
    for name, parameter in tadp.named_parameters():
        assert parameter.grad is not None, name
        at_init_zero = "adapter" in name and any(part in name for part in upstream_of_up)
        assert (parameter.grad.abs().sum() == 0) == at_init_zero, name
    assert all(p.grad is None for p in backbone.parameters())

    with torch.no_grad():
        for name, parameter in tadp.named_parameters():
            if ".up." in name:
                parameter -= 1e-2 * parameter.grad.sign()
    tadp.zero_grad()
    loss_of(backbone, builtin_batches).backward()
    for name, parameter in tadp.named_parameters():
        assert parameter.grad.abs().sum() > 0, name
    tadp.detach()


def test_activation_checkpointing_reuses_the_forward_prompts(builtin_batches):
    """Recomputed blocks in backward use the cached prompts: same gradients, one source call."""
    gradients = []
    torch.manual_seed(0)
    state = TADP(frozen_tiny(), VARIABLES, TADPConfig(prompt_length=4)).state_dict()
    for checkpointing in (False, True):
        backbone = frozen_tiny(activation_checkpointing=checkpointing).train()
        tadp = TADP(backbone, VARIABLES, TADPConfig(prompt_length=4))
        tadp.load_state_dict(state)
        source = tadp.injector.source = CountingSource(tadp.prompts)
        tadp.attach()
        loss_of(backbone, builtin_batches).backward()
        assert source.calls == 1
        gradients.append([p.grad for p in tadp.parameters()])
        tadp.detach()
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(checkpointed, plain)


@pytest.mark.parametrize("width_map", ["linear", "lowrank"])
@pytest.mark.parametrize("sharing, generators, projections",
                         [("block", 8, 4), ("stage", 4, 2), ("all", 1, 1)])
def test_sharing_modes_and_exact_parameter_counts(sharing, generators, projections, width_map):
    backbone = frozen_tiny()
    for length in (30, 8):
        config = TADPConfig(prompt_length=length, sharing=sharing, width_map=width_map)
        tadp = TADP(backbone, backbone.embedding_variables, config)
        assert len(tadp.generators) == generators
        assert len(tadp.projections) == projections
        assert all(p.shape == (length, width) for p, width in zip(tadp.prompts().values(), WIDTHS))
        built = sum(p.numel() for p in tadp.parameters())
        assert tadp_parameter_count(backbone, len(backbone.embedding_variables), config) == built
    small = TADPConfig(sharing=sharing, prompt_length=5, width_map=width_map)
    assert tadp_parameter_count(backbone, 3, small) == \
        sum(p.numel() for p in TADP(backbone, VARIABLES, small).parameters())


def test_fit_tadp_config_picks_the_longest_prompt_that_fits():
    backbone = frozen_tiny()
    base = TADPConfig(sharing="stage")
    count = {length: tadp_parameter_count(backbone, 3,
                                          dataclasses.replace(base, prompt_length=length))
             for length in (4, 12, 13, 30)}
    assert fit_tadp_config(backbone, 3, count[30] * 10, base) == base
    assert fit_tadp_config(backbone, 3, count[12], base).prompt_length == 12
    assert fit_tadp_config(backbone, 3, count[13] - 1, base).prompt_length == 12
    assert fit_tadp_config(backbone, 3, count[4] - 1, base) is None
    assert fit_tadp_config(backbone, 3, count[4] - 1, base, min_prompt_length=1).prompt_length < 4
    with pytest.raises(ValueError, match="min_prompt_length"):
        fit_tadp_config(backbone, 3, count[30], base, min_prompt_length=31)
