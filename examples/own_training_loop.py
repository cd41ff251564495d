"""Aurora's documented fine-tuning loop, with weatherpeft in it: four lines change.

Aurora's documentation (https://microsoft.github.io/aurora/finetuning.html) fine-tunes like this:

    model = AuroraPretrained()
    model.load_checkpoint()
    model.configure_activation_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for batch in batches:
        optimizer.zero_grad()
        pred = model.forward(batch)
        loss = torch.mean(torch.abs(pred.surf_vars["2t"] - target.surf_vars["2t"]))
        loss.backward()
        optimizer.step()

Below is the same loop; lines marked ``# weatherpeft`` are the changes. The model here is
aurora-tiny, the architecture weatherpeft ships pretrained on its built-in world (so that this runs
on a laptop in a minute); with Microsoft's weights, build ``AuroraPretrained()`` and call
``model.load_checkpoint()`` instead of the two lines that build and load it.

    python examples/own_training_loop.py --steps 20 --out runs/own-loop
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import torch
from aurora import Aurora
from safetensors.torch import load_file

import weatherpeft
from weatherpeft.backbones.aurora import AURORA_TINY
from weatherpeft.data.builtin import store_path
from weatherpeft.data.stats import NormalisationStats
from weatherpeft.data.wb2 import SampleSpec, WB2Dataset, collate_batches

PRETRAINED = Path(__file__).resolve().parents[1] / "models" / "aurora-tiny"


def batches(steps: int, batch_size: int, samples: int):
    """(input, target) pairs from March of the built-in downstream year, the target a day after
    the input (the task here: turn the 6-hour forecaster into a one-day forecaster); ``samples``
    of them, cycled in fixed batches as in Aurora's example loop."""
    dataset = WB2Dataset(store_path("downstream"), SampleSpec(start="2003-03-01", end="2003-03-31",
                                                              lead=timedelta(hours=24)))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:samples]
    fixed = [collate_batches([dataset[int(i)] for i in chosen[start:start + batch_size]])
             for start in range(0, samples - batch_size + 1, batch_size)]
    for step in range(steps):
        yield fixed[step % len(fixed)]


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="weatherpeft")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", default="runs/own-loop")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # Aurora as its documentation builds it (here: aurora-tiny and its weights).
    NormalisationStats.load(PRETRAINED / "normalisation.json").install()
    model = Aurora(**AURORA_TINY, use_lora=False)
    model.load_state_dict(load_file(PRETRAINED / "model.safetensors"))

    model = weatherpeft.adapt(model, args.method, args.budget,  # weatherpeft
                              activation_checkpointing=True)
    model.train()
    optimizer = model.configure_optimizer(steps=args.steps, lr=args.lr)  # weatherpeft
    losses = []
    for batch, target in batches(args.steps, args.batch_size, args.samples):
        pred = model.forward(batch)
        loss = torch.mean(torch.abs(pred.surf_vars["2t"] - target.surf_vars["2t"]))
        loss.backward()
        model.step(loss)  # weatherpeft: the method's hooks, optimizer.step() and zero_grad()
        losses.append(loss.item())
        print(f"step {len(losses):3d}  loss {losses[-1]:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}")
    folder = model.save_adapter(args.out)  # weatherpeft
    report = model.report()
    print(f"adapter: {folder} ({report.stored:,} stored entries, {report.stored_fraction:.2%} of "
          f"{report.pretrained:,})")
    return losses


if __name__ == "__main__":
    main()
