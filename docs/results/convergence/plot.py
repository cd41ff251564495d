"""Learning curves of the runs under runs/ (validation loss every 100 steps) → curves.png.

    python docs/results/convergence/plot.py
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
LABELS = {"full": "full", "frozen": "encoder/decoder only", "lora": "LoRA 0.3 %"}


def curve(run: Path) -> tuple[list[int], list[float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    points = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return [s for s, _ in points], [v for _, v in points]


def main() -> None:
    tasks = sorted({run.name.split("_")[0] for run in (HERE / "runs").iterdir()})
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6))
    for axis, task in zip(axes, tasks):
        for run in sorted((HERE / "runs").glob(f"{task}_*")):
            method = run.name.split("_")[1]
            axis.plot(*curve(run), marker=".", label=LABELS.get(method, method))
        axis.set(title=f"{task} (train protocol, seed 0)", xlabel="step",
                 ylabel="validation loss")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(HERE / "curves.png", dpi=110)


if __name__ == "__main__":
    main()
