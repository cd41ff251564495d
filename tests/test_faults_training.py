"""Training under faults: preemption signals, a kill in the middle of a save, divergence.

Each test injects its fault: a signal sent by a hook to the own process or by the test to a
training subprocess, a SIGKILL while a (slowed) checkpoint write is under way, NaN or zero
values planted in a batch, an infinite gradient written by a hook.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from aurora import Batch
from test_train import ToyModel, ToyTask, config, records

from weatherpeft import cli, distributed
from weatherpeft.atomic import atomic_write
from weatherpeft.training import (
    DivergenceError,
    Trainer,
    TrainingHook,
    TrainingInterrupted,
    epoch_permutation,
    latest_checkpoint,
    load_model_state,
    lr_factor,
)

TESTS = Path(__file__).parent
#: The settings of test_train's exact-resume test: accumulation, warm-up, clipping, dropout.
EXACT = dict(steps=6, batch_size=2, accumulation_steps=2, warmup_steps=2, min_lr_ratio=0.1,
             grad_clip=0.5, val_every=2, val_batches=1, log_every=1)


class Pace(TrainingHook):
    """Prints each finished step (flushed) and sleeps ``delay`` s; on ``signal_at`` (a 0-based
    step index, on rank ``rank``) sends ``signals`` to its own process."""

    def __init__(self, delay: float = 0.0, signal_at: int | None = None,
                 signals: tuple[int, ...] = (signal.SIGTERM,), rank: int = 0):
        self.delay, self.signal_at, self.signals, self.rank = delay, signal_at, signals, rank

    def on_after_optimizer_step(self, trainer, step):
        print(f"step {trainer.step}", flush=True)
        if step == self.signal_at and distributed.rank() == self.rank:
            for signum in self.signals:
                os.kill(os.getpid(), signum)
        time.sleep(self.delay)


def build(out: Path, hook: object = None, seed: int = 0, **settings) -> tuple[Trainer, ToyModel]:
    torch.manual_seed(seed)  # a resumed run starts from other weights: the checkpoint restores them
    model = ToyModel(dropout=0.2)
    values = {**EXACT, **settings}
    return Trainer(model, ToyTask(n_train=10), config(out, **values),
                   hooks=[hook or Pace()]), model


def assert_same_run(straight: Trainer, resumed: Trainer, out_a: Path, out_b: Path) -> None:
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.optimizer.state.values(), resumed.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    keep = lambda log: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in log]  # noqa: E731
    assert keep(records(out_a)) == keep(records(out_b))


# --------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_the_step_and_resume_is_exact(tmp_path, signum):
    straight, _ = build(tmp_path / "straight")
    straight.fit()

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    interrupted, _ = build(tmp_path / "resumed", Pace(signal_at=2, signals=(signum,)))
    with pytest.raises(TrainingInterrupted) as caught:
        interrupted.fit()
    stop = caught.value
    assert (stop.signum, stop.step, stop.exit_code) == (signum, 3, 128 + signum)
    assert stop.checkpoint == latest_checkpoint(tmp_path / "resumed")
    assert stop.checkpoint.name == "step_00000003.pt"  # the step the signal arrived in, finished
    assert signal.Signals(signum).name in str(stop) and "resume" in str(stop)
    assert {s: signal.getsignal(s) for s in handlers} == handlers

    resumed, _ = build(tmp_path / "resumed", seed=123)
    resumed.fit(resume=True)
    assert resumed.step == 6
    assert_same_run(straight, resumed, tmp_path / "straight", tmp_path / "resumed")


def test_a_second_signal_aborts_at_once(tmp_path):
    trainer, _ = build(tmp_path, Pace(signal_at=1, signals=(signal.SIGINT, signal.SIGINT)))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(KeyboardInterrupt, match="second stop signal"):
        trainer.fit()
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert latest_checkpoint(tmp_path) is None


def test_fit_outside_the_main_thread_leaves_signals_alone(tmp_path):
    summaries = []
    trainer, _ = build(tmp_path, steps=2)
    thread = threading.Thread(target=lambda: summaries.append(trainer.fit()))
    thread.start()
    thread.join()
    assert summaries[0]["step"] == 2  # signal.signal would have raised outside the main thread


def test_the_cli_exits_with_the_conventional_codes(monkeypatch, capsys):
    def stopped(args):
        raise TrainingInterrupted(signal.SIGTERM, 4, Path("run/checkpoints/step_00000004.pt"))

    def diverged(args):
        raise DivergenceError("training loss is nan at step 2 (lr 0.001)", step=2, lr=1e-3)

    monkeypatch.setattr(cli, "cmd_methods", stopped)
    assert cli.main(["methods"]) == 143
    assert "SIGTERM after step 4" in capsys.readouterr().err
    monkeypatch.setattr(cli, "cmd_methods", diverged)
    assert cli.main(["methods"]) == 1
    assert "loss is nan at step 2" in capsys.readouterr().err


def child(mode: str, out: str) -> None:
    """The training subprocess: ``sigterm`` trains slowly (with a DataLoader worker) until
    stopped; ``sigkill`` saves a checkpoint every step and hangs in the middle of writing
    step 3."""
    torch.set_num_threads(1)
    out = Path(out)
    if mode == "sigterm":
        trainer, _ = build(out, Pace(delay=0.2), steps=20, num_workers=1)
    else:
        trainer, _ = build(out, checkpoint_every=1, keep_checkpoints=1)
        real_save = torch.save

        def save_then_hang_at_step_3(content, path):
            if content["step"] == 3:
                Path(path).write_bytes(b"the first bytes of a checkpoint")
                print("writing", flush=True)
                time.sleep(60)
            real_save(content, path)

        torch.save = save_then_hang_at_step_3
    try:
        trainer.fit()
    except TrainingInterrupted as stop:
        print(stop, flush=True)
        sys.exit(stop.exit_code)


def start_child(mode: str, out: Path) -> subprocess.Popen:
    """The child in a process group of its own (with its DataLoader workers)."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen(
        [sys.executable, "-c", "import sys, test_faults_training as t; t.child(*sys.argv[1:])",
         mode, str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=environment, start_new_session=True)


def read_until(process: subprocess.Popen, done, seconds: float = 60) -> list[str]:
    """Lines of the child's output until ``done(line)``; fails if it ends or takes too long."""
    lines, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"the child ended (code {process.wait()}) before it got there:\n"
                        + "".join(lines))
        lines.append(line)
        if done(line):
            return lines
    process.kill()
    pytest.fail("the child took too long:\n" + "".join(lines))


@pytest.mark.slow
def test_sigterm_from_outside_stops_a_training_process_that_resumes_exactly(tmp_path):
    process = start_child("sigterm", tmp_path / "resumed")
    try:
        lines = read_until(process, lambda line: line.startswith("step 3"))
        os.killpg(process.pid, signal.SIGTERM)  # as a scheduler does: the workers get it too
        output = "".join(lines) + process.communicate(timeout=60)[0]
    finally:
        process.kill()
    assert process.returncode == 143, output
    stopped_at = max(int(line.split()[1]) for line in output.splitlines() if line.startswith("step "))
    assert f"SIGTERM after step {stopped_at}" in output
    assert latest_checkpoint(tmp_path / "resumed").name == f"step_{stopped_at:08d}.pt"
    assert stopped_at < 20

    straight, _ = build(tmp_path / "straight", steps=20)
    straight.fit()
    resumed, _ = build(tmp_path / "resumed", seed=123, steps=20)
    resumed.fit(resume=True)
    assert_same_run(straight, resumed, tmp_path / "straight", tmp_path / "resumed")


# --------------------------------------------------------------------------------------
# A kill in the middle of a save
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_save_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "resumed"
    process = start_child("sigkill", out)
    try:
        read_until(process, lambda line: line.strip() == "writing")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    folder = out / "checkpoints"
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step_00000003.pt.")
    # keep_checkpoints=1: step 2 was pruned only after step 2 was in place, and still is
    assert latest_checkpoint(out) == folder / "step_00000002.pt"
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".tmp")) \
        == ["step_00000002.pt"]
    assert load_model_state(ToyModel(), latest_checkpoint(out)) == 2

    straight, _ = build(tmp_path / "straight", checkpoint_every=1, keep_checkpoints=1)
    straight.fit()
    resumed, _ = build(out, seed=123, checkpoint_every=1, keep_checkpoints=1)
    resumed.fit(resume=True)
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000006.pt"]  # leftover cleaned
    assert_same_run(straight, resumed, tmp_path / "straight", out)


def test_atomic_write_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    import weatherpeft.atomic as atomic

    events = []
    fsync, replace = atomic._fsync, os.replace
    monkeypatch.setattr(atomic, "_fsync", lambda path: (events.append(("fsync", path)), fsync(path)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b))), replace(a, b)))
    atomic_write(tmp_path / "file.bin", lambda temporary: temporary.write_bytes(b"data"))
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].name.endswith(".tmp") and events[2][1] == tmp_path


# --------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------


class WeightSpyTask(ToyTask):
    """Records the weights at every call of ``training_loss``."""

    def __init__(self):
        super().__init__(n_train=10)
        self.weights_seen = []

    def training_loss(self, model, batch):
        self.weights_seen.append([p.detach().clone() for p in model.parameters()])
        return super().training_loss(model, batch)


def poisoned_task(step: int, where: str, value: float = math.nan,
                  task: ToyTask | None = None) -> ToyTask:
    """``task`` (a ToyTask) whose first sample of training batch ``step`` (batch size 2,
    epoch 0) holds ``value`` at input[1, 2, 3] or target[0, 1, 1]."""
    task = task or ToyTask(n_train=10)
    samples = task.datasets()["train"]
    index = int(epoch_permutation(len(samples), 0, 0)[2 * step])
    if where == "input":
        samples.inputs[index, 1, 2, 3] = value
    else:
        samples.targets[index, 0, 1, 1] = value
    return task


def divergence_config(tmp_path, **overrides):
    return config(tmp_path, **{**dict(steps=6, batch_size=2, lr=0.05), **overrides})


@pytest.mark.parametrize("where, found", [("input", "input.surf_vars['2t'] at index (0, 1, 2, 3)"),
                                          ("target", "target.surf_vars['2t'] at index (0, 0, 1, 1)")])
def test_a_nan_in_the_data_stops_training_with_its_variable_step_and_lr(tmp_path, where, found):
    model = ToyModel()
    trainer = Trainer(model, poisoned_task(3, where), divergence_config(tmp_path))
    with pytest.raises(FloatingPointError) as caught:
        trainer.fit()
    error = caught.value
    lr = 0.05 * lr_factor(3, total_steps=6, warmup_steps=0, min_lr_ratio=0.0)
    assert isinstance(error, DivergenceError) and (error.step, error.lr) == (3, pytest.approx(lr))
    assert f"training loss is nan at step 3 (lr {lr:.6g})" in str(error)
    assert found in str(error)
    assert trainer.step == 3 and all(torch.isfinite(p).all() for p in model.parameters())
    assert latest_checkpoint(tmp_path) is None


class ZeroLogModel(ToyModel):
    """Adds 0·log|x₁|: finite for nonzero inputs, NaN where an input is exactly 0."""

    def forward(self, batch: Batch) -> Batch:
        out = super().forward(batch)
        poison = 0.0 * torch.log(batch.surf_vars["2t"][:, 1:].abs())
        return Batch(surf_vars={"2t": out.surf_vars["2t"] + poison}, static_vars={}, atmos_vars={},
                     metadata=out.metadata)


def test_a_nan_made_by_the_model_names_the_prediction(tmp_path):
    trainer = Trainer(ZeroLogModel(), poisoned_task(2, "input", value=0.0),
                      divergence_config(tmp_path))
    with pytest.raises(DivergenceError, match=r"at step 2 .*the model's output is not: "
                                              r"prediction.surf_vars\['2t'\] at index \(0, 0, 2, 3\)"):
        trainer.fit()


class BackwardSpy(TrainingHook):
    """Counts on_after_backward calls; at ``poison_at``, makes the gain's gradient infinite."""

    def __init__(self, poison_at: int | None = None):
        self.poison_at, self.calls = poison_at, 0

    def on_after_backward(self, trainer, step):
        self.calls += 1
        assert all(torch.isfinite(p.grad).all() for p in trainer.model.parameters()
                   if p.grad is not None), "a hook saw a non-finite gradient"
        if step == self.poison_at:
            trainer.model.gain.grad.fill_(math.inf)


def test_an_infinite_gradient_from_a_hook_never_reaches_the_optimizer(tmp_path):
    model = ToyModel()
    trainer = Trainer(model, ToyTask(), divergence_config(tmp_path, grad_clip=1.0),
                      hooks=[BackwardSpy(poison_at=2)])
    with pytest.raises(DivergenceError, match=r"gradient norm is inf \(loss [0-9.]+\) at step 2 "
                                              r"\(lr [0-9.]+\); first non-finite gradient: 'gain'"):
        trainer.fit()
    assert trainer.step == 2 and all(torch.isfinite(p).all() for p in model.parameters())


class RootModel(ToyModel):
    """Adds √r with r = 0: a finite loss whose gradient for r is infinite at every step."""

    def __init__(self):
        super().__init__()
        self.root = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> Batch:
        out = super().forward(batch)
        return Batch(surf_vars={"2t": out.surf_vars["2t"] + torch.sqrt(self.root)}, static_vars={},
                     atmos_vars={}, metadata=out.metadata)


def test_skipping_stops_after_max_skipped_steps_and_hooks_never_see_bad_gradients(tmp_path):
    model, spy = RootModel(), BackwardSpy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, ToyTask(), divergence_config(tmp_path, on_nonfinite="skip",
                                                          max_skipped_steps=2), hooks=[spy])
    with pytest.raises(DivergenceError, match=r"first non-finite gradient: 'root' — 3 updates "
                                              r"skipped, more than max_skipped_steps=2"):
        trainer.fit()
    assert spy.calls == 0  # the gradients were checked before the hooks
    assert (trainer.step, trainer.skipped_steps, trainer.batch_in_epoch) == (0, 3, 3)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert not trainer.optimizer.state  # AdamW never stepped


def test_a_skipped_step_changes_nothing_and_is_counted(tmp_path, caplog):
    task = poisoned_task(3, "input", task=WeightSpyTask())
    trainer = Trainer(ToyModel(), task, divergence_config(tmp_path, on_nonfinite="skip"))
    with caplog.at_level(logging.WARNING, logger="weatherpeft.training"):
        summary = trainer.fit()
    assert "update skipped (1 of at most 10): training loss is nan at step 3" in caplog.text
    assert "input.surf_vars['2t'] at index (0, 1, 2, 3)" in caplog.text
    seen = task.weights_seen  # 6 updates, the skipped attempt and its diagnosing forward
    assert len(seen) == 8 and not all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))
    for later in seen[4:6]:  # the diagnosis and the retry start from the weights step 2 left
        assert all(torch.equal(a, b) for a, b in zip(seen[3], later))
    assert (trainer.step, trainer.epoch, trainer.batch_in_epoch) == (6, 1, 2)  # 7 batches used
    assert trainer.scheduler.last_epoch == 6
    assert all(int(state["step"]) == 6 for state in trainer.optimizer.state.values())
    assert summary["skipped_steps"] == 1
    assert [r["skipped_steps"] for r in records(tmp_path)] == [0, 0, 0, 1, 1, 1]
    assert torch.load(latest_checkpoint(tmp_path), weights_only=True)["skipped_steps"] == 1


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path):
    model = ToyModel()
    trainer = Trainer(model, ToyTask(), divergence_config(tmp_path))
    with torch.no_grad():
        model.mix.bias.fill_(math.nan)
    with pytest.raises(DivergenceError, match=r"refusing to checkpoint step 0: parameter 'mix.bias'"):
        trainer.save_checkpoint()
    assert latest_checkpoint(tmp_path) is None


def test_config_rejects_bad_fault_settings():
    with pytest.raises(ValueError, match="on_nonfinite must be 'stop' or 'skip'"):
        config(Path("unused"), on_nonfinite="ignore")
    with pytest.raises(ValueError, match="max_skipped_steps must not be negative"):
        config(Path("unused"), max_skipped_steps=-1)


# --------------------------------------------------------------------------------------
# Two ranks (DDP over Gloo): they agree on stopping and on non-finite steps
# --------------------------------------------------------------------------------------

WORLD = 2


def _rank_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))  # a hang fails
    out, results = Path(out), {}
    ddp = dict(steps=6, batch_size=1, lr=0.05, strategy="ddp")
    trainer = Trainer(ToyModel(), ToyTask(), config(out / "signal", **ddp),
                      hooks=[Pace(signal_at=1, rank=1)])  # only rank 1 gets the signal
    try:
        trainer.fit()
    except TrainingInterrupted as stop:
        results["signal"] = (stop.signum, stop.step, stop.checkpoint.name)
    # Global batch 3 is samples (perm[6], perm[7]); rank 1 gets perm[7], with a NaN.
    task = ToyTask()
    samples = task.datasets()["train"]
    samples.inputs[int(epoch_permutation(len(samples), 0, 0)[7]), 0, 0, 0] = math.nan
    for mode in ("stop", "skip"):
        trainer = Trainer(ToyModel(), task, config(out / mode, **ddp, on_nonfinite=mode))
        try:
            trainer.fit()
            results[mode] = (trainer.step, trainer.skipped_steps,
                             [p.detach().clone() for p in trainer.model.parameters()])
        except DivergenceError as error:
            results[mode] = str(error)
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_to_stop_and_on_non_finite_steps(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_rank_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert first["signal"] == second["signal"] == (signal.SIGTERM, 2, "step_00000002.pt")
    assert "training loss is nan at step 3" in first["stop"] and "at step 3" in second["stop"]
    assert "rank 0: inputs, targets, weights and predictions are finite" in first["stop"]
    assert "rank 1: non-finite value in the data: input.surf_vars['2t'] at index (0, 0, 0, 0)" \
        in second["stop"]
    assert first["skip"][:2] == second["skip"][:2] == (6, 2)  # the sample is back in epoch 1
    assert all(torch.equal(a, b) for a, b in zip(first["skip"][2], second["skip"][2]))
