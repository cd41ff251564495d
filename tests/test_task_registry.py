"""Tasks by name: register_task, entry-point plugins, task options, early errors, path rule."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import PRETRAINED_TINY

from weatherpeft.backbones import backbone_statistics
from weatherpeft.data.paths import CHECKOUT, resolve_path
from weatherpeft.tasks import TASKS, build_task, parse_task_options, register_task, registry, task_names
from weatherpeft.tasks.grid import AURORA_TINY_GRID, PatchGrid, backbone_grid


class Opened(Exception):
    """Raised by a builder: it was reached (so the checks before it passed)."""


@pytest.fixture
def registered():
    """Task names registered by a test are removed after it."""
    before = set(TASKS)
    yield
    for name in set(TASKS) - before:
        del TASKS[name]


def toy_builder(data, stats, *, grid, scale: float = 1.0, names: tuple[str, ...] = ("2t",)):
    """A toy task for the registry's tests."""
    raise Opened((data, scale, names, grid))


def test_register_task_makes_a_name_with_its_options(registered):
    entry = register_task("toy", toy_builder)
    assert entry.summary == "A toy task for the registry's tests."
    assert "toy" in task_names()
    with pytest.raises(Opened) as opened:
        build_task("toy", None, "x.zarr", '{"scale": 2, "names": ["2t", "z"]}')
    assert opened.value.args[0] == ("x.zarr", 2.0, ("2t", "z"), AURORA_TINY_GRID)
    with pytest.raises(ValueError, match="already registered"):
        register_task("toy", toy_builder)
    register_task("toy", toy_builder, replace=True)
    with pytest.raises(TypeError, match=r"must take \(data, stats, \*, grid"):
        register_task("bad", lambda data, stats: None)


@pytest.mark.parametrize("options, message", [
    ('{"scael": 2}', r"task 'toy' has no option\(s\) \['scael'\]; its options: \['names', 'scale'\]"),
    ('{"scale": "big"}', r"task option 'scale': expected a number, got 'big'"),
    ('{"names": "2t"}', r"task option 'names': expected a list"),
    ('{"names": [1]}', r"task option 'names\[0\]': expected a string"),
    ("[1, 2]", "task options must be a JSON object, got list"),
    ("{oops", "--task-options must be a JSON object"),
])
def test_bad_task_options_are_named_before_the_builder_runs(registered, options, message):
    register_task("toy", toy_builder)
    with pytest.raises(ValueError, match=message):
        build_task("toy", None, "", options)


def test_an_entry_point_plugin_is_found(tmp_path, monkeypatch, registered):
    """A distribution declaring a task in the group weatherpeft.tasks, found on sys.path."""
    (tmp_path / "toy_plugin.py").write_text(textwrap.dedent('''
        def build(data, stats, *, grid, depth: int = 1):
            """A plugin task."""
            raise RuntimeError(f"plugin built with depth {depth}")
    '''))
    info = tmp_path / "toy_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[weatherpeft.tasks]\ntoy-plugin = toy_plugin:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert "toy-plugin" in task_names()
    assert registry.TASKS["toy-plugin"].options == {"depth": (int, 1)}
    with pytest.raises(RuntimeError, match="plugin built with depth 3"):
        build_task("toy-plugin", None, "", {"depth": 3})


def test_an_unknown_task_lists_the_known_ones_and_how_to_add_one():
    with pytest.raises(ValueError, match=r"unknown task 'nope'; known: \[.*'postprocessing'.*register_task"):
        build_task("nope", None)


def test_benchmark_takes_a_registered_task(registered):
    from weatherpeft.benchmark import PROFILES, BenchmarkConfig, plan

    register_task("toy", toy_builder)
    runs = plan(BenchmarkConfig(tasks=("toy",), methods=("lora",), encoder_decoder=("train",)))
    quick = PROFILES["quick"]  # an outside task takes the profile's downscaling protocol
    assert [(r.task, r.steps, r.batch_size) for r in runs] == \
        [("toy", quick.steps["downscaling"], quick.batch_size["downscaling"])]
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]"):
        BenchmarkConfig(tasks=("nope",))


# -- built-in tasks: options and what is refused before training --------------------------


@pytest.fixture(scope="module")
def stats():
    return backbone_statistics(PRETRAINED_TINY)


def test_postprocessing_takes_lead_variables_static_fields_and_periods(stats):
    periods = {"train": ["2003-01-01", "2003-06-30T18:00"], "val": ["2003-07-01", "2003-08-31"],
               "test": ["2003-09-01", "2003-09-30T18:00"]}
    task = build_task("postprocessing", stats, "", {"lead_hours": 48, "surf_vars": ["2t"],
                                                    "atmos_vars": ["t"], "static_vars": ["lsm"],
                                                    "levels": [850], "periods": periods})
    assert task.variables.surf_vars == ("2t", "2t_spread") and task.variables.levels == (850,)
    assert task.variables.static_vars == ("lsm",)
    assert task.periods["test"] == ("2003-09-01", "2003-09-30T18:00")
    assert task.inits("test").min().month == 9


@pytest.mark.parametrize("key, kind", [("static_vars", "static field"),
                                       ("surf_vars", "surface variable"),
                                       ("atmos_vars", "atmospheric variable")])
def test_aurora_needs_each_kind_of_variable(stats, key, kind):
    """Before: a bare StopIteration or "stack expects a non-empty TensorList" inside Aurora."""
    with pytest.raises(ValueError, match=f"option '{key}' is empty, but an Aurora backbone needs "
                                         f"at least one {kind}"):
        build_task("postprocessing", stats, "/absent,/absent", {key: []})


def test_periods_are_checked_before_any_data_are_read(stats):
    with pytest.raises(ValueError, match=r"'periods.train': 2003-05-01 is after 2003-01-01"):
        build_task("forecasting", stats, "/absent.zarr", {"periods": {
            "train": ["2003-05-01", "2003-01-01"], "val": ["2003-01-01", "2003-01-02"],
            "test": ["2003-01-01", "2003-01-02"]}})
    with pytest.raises(ValueError, match=r"needs exactly \['train', 'val', 'test'\]; missing \['test'\]"):
        build_task("forecasting", stats, "/absent.zarr", {"periods": {
            "train": ["2003-01-01", "2003-01-02"], "val": ["2003-01-01", "2003-01-02"]}})


def test_an_ensemble_truth_store_is_refused_unless_a_member_is_chosen(stats):
    """Before: member 0 at lead 0 was used silently."""
    from weatherpeft.data.builtin import store_path

    data = f"{store_path('ensemble')},{store_path('ensemble')}"
    with pytest.raises(ValueError, match=r"is an ensemble forecast .* not an analysis: .* truth_member"):
        build_task("postprocessing", stats, data, {"lead_hours": 48})
    with pytest.raises(ValueError, match=r"truth_member 99 not in truth store .*'number' holds \[0, 1"):
        build_task("postprocessing", stats, data, {"lead_hours": 48, "truth_member": 99})
    with pytest.raises(ValueError, match="has no lead 0"):  # the built-in ensemble starts at 24 h
        build_task("postprocessing", stats, data, {"lead_hours": 48, "truth_member": 1})


def test_downscaling_on_the_regional_store_names_the_sizes_that_fit(stats):
    """Before: "RuntimeError: view size is not compatible …" inside Aurora, at the first step."""
    from weatherpeft.data.builtin import store_path

    with pytest.raises(ValueError, match=r"has 20 × 20 cells .* Swin stage 1 the token grid is "
                                         r"5 × 5 .* Nearest sizes that fit: 16 × 20"):
        build_task("downscaling", stats, str(store_path("regional")))
    task = build_task("downscaling", stats, str(store_path("regional")),
                      {"region": [5, 50, 70, 125], "coarse_factor": 2})
    assert task.datasets()["train"][0][1].spatial_shape == (16, 20)


def test_the_grid_rule_matches_aurora():
    """Sizes the rule accepts run through aurora-tiny's architecture; those it refuses fail."""
    from datetime import datetime

    import torch
    from aurora import Aurora, Batch, Metadata

    from weatherpeft.backbones.aurora import AURORA_TINY

    model = Aurora(**{**AURORA_TINY, "use_lora": False}).eval()
    grid = PatchGrid.from_architecture(AURORA_TINY)
    assert grid == backbone_grid(PRETRAINED_TINY) == AURORA_TINY_GRID
    for height, width in ((20, 20), (16, 20), (17, 32), (32, 16), (8, 40), (28, 56)):
        batch = Batch(surf_vars={"2t": torch.randn(1, 2, height, width)},
                      static_vars={"lsm": torch.randn(height, width)},
                      atmos_vars={"z": torch.randn(1, 2, 2, height, width)},
                      metadata=Metadata(lat=torch.linspace(80, -80, height),
                                        lon=torch.linspace(0, 350, width),
                                        time=(datetime(2003, 1, 1),), atmos_levels=(500, 850)))
        try:
            with torch.no_grad():
                model(batch)
            ran = True
        except (RuntimeError, AssertionError):
            ran = False
        assert ran == grid.fits(height, width), (height, width, grid.problem(height, width))


def test_relative_paths_resolve_from_the_working_folder_then_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("models/aurora-tiny", "backbone") == CHECKOUT / "models" / "aurora-tiny"
    assert backbone_statistics("models/aurora-tiny").scales  # the loaders follow the same rule
    (tmp_path / "models" / "aurora-tiny").mkdir(parents=True)  # a user's own folder wins
    assert resolve_path("models/aurora-tiny", "backbone") == Path("models/aurora-tiny")
    with pytest.raises(FileNotFoundError, match=rf"backbone not found: models/other is neither in "
                                                rf"the working folder \({tmp_path}/models/other\) nor "
                                                rf"in the weatherpeft checkout \({CHECKOUT}/models/other\)"):
        resolve_path("models/other", "backbone")


def test_yaml_gives_task_options_as_a_mapping(tmp_path):
    from weatherpeft.cli import build_parser
    from weatherpeft.config import build_config
    from weatherpeft.finetune import FinetuneConfig
    from weatherpeft.train import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("task: postprocessing\ntask_options:\n  lead_hours: 24\n  static_vars: [lsm]\n"
                    "  periods: {train: [2003-01-01, 2003-06-30], val: [2003-07-01, 2003-07-31],"
                    " test: [2003-08-01, 2003-08-31]}\n")
    args = build_parser().parse_args(["finetune", "--config", str(path)])
    config = build_config(FinetuneConfig, args, shared_keys=tuple(TrainConfig.__dataclass_fields__))
    options = parse_task_options(config.task, config.task_options)
    assert options["lead_hours"] == 24.0 and options["static_vars"] == ("lsm",)
    assert options["periods"]["train"] == ("2003-01-01", "2003-06-30")


def test_tasks_command_lists_every_task_and_its_options(capsys):
    from weatherpeft.cli import main

    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("forecasting", "downscaling", "postprocessing", "precipitation"):
        assert f"\n{name} " in out
    assert "truth_member: int | None (default null)" in out and "weatherpeft.tasks" in out


def test_a_task_with_only_the_four_abstract_members_loads_its_backbone():
    """Before: run_finetune read task.stats, which the contract never mentioned (AttributeError)."""
    from weatherpeft.finetune import task_backbone
    from weatherpeft.tasks import Task, TaskVariables

    class Minimal(Task):
        variables = TaskVariables(surf_vars=("2t",), atmos_vars=("z",), static_vars=("lsm",),
                                  levels=(500,))

        def datasets(self):
            return {}

        def loss(self, prediction, target):
            raise NotImplementedError

        def evaluate(self, model, loader):
            return {}

    backbone = task_backbone(str(PRETRAINED_TINY), Minimal())
    assert backbone.stats.scales == backbone_statistics(PRETRAINED_TINY).scales

    class NoStatic(Minimal):
        variables = TaskVariables(surf_vars=("2t",), atmos_vars=("z",), static_vars=(), levels=(500,))

    with pytest.raises(ValueError, match="task 'task': an Aurora backbone needs at least one static field"):
        task_backbone(str(PRETRAINED_TINY), NoStatic())


def test_the_published_aurora_runs_on_the_quarter_degree_grid():
    from weatherpeft.tasks.grid import preset_grid

    grid = preset_grid("aurora-0.25-pretrained")  # Aurora's class defaults: window (2, 6, 12), 3 stages
    assert grid == PatchGrid(patch_size=4, window=(6, 12), stages=3)
    assert grid.fits(721, 1440) and grid.used_rows(721) == 720
    assert preset_grid("prithvi-tiny") is None and backbone_grid(CHECKOUT / "models" / "prithvi-tiny") is None


def test_a_region_crops_every_store_of_a_task(stats):
    task = build_task("postprocessing", stats, "", {"region": [-45, 45, 0, 175], "surf_vars": ["2t"],
                                                    "atmos_vars": ["z"], "levels": [500]})
    inputs, target = task.datasets()["test"][0]
    assert inputs.spatial_shape == target.spatial_shape == (16, 32)
    assert float(target.metadata.lat.max()) < 45 and float(target.metadata.lon.max()) < 175
    with pytest.raises(ValueError, match=r"16 × 33 cells .* 33 longitude cells are not a multiple "
                                         r"of the patch size 4"):
        build_task("forecasting", stats, "", {"region": [-45, 45, 0, 180]})
