"""Learning curves for choosing the benchmark's training lengths.

    python docs/results/convergence/run.py TASK METHOD STEPS SEED OUT [ENCODER_DECODER] [OPTIONS_JSON]

One run of the benchmark's training protocol (AdamW, 10 % warm-up, cosine to 0.1 × lr, clip 1,
batch 2, lr 1e-3, new_lr 6e-3, budget 0.3 %) with the validation loss logged every STEPS/20
steps to OUT/metrics.jsonl; OUT/summary.json gets the test scores and the wall time.
"""
import dataclasses
import json
import logging
import sys
import time

import torch

from weatherpeft.benchmark import training_protocol
from weatherpeft.finetune import FinetuneConfig, run_finetune

torch.set_num_threads(1)
logging.basicConfig(level=logging.WARNING)
task, method, steps, seed, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
protocol = sys.argv[6] if len(sys.argv) > 6 else "train"
options = sys.argv[7] if len(sys.argv) > 7 else "{}"
config = FinetuneConfig(task=task, method=method, budget=0.003, options=options, new_lr=6e-3,
                        threads=1, encoder_decoder=protocol)
train = dataclasses.replace(training_protocol(steps, 2, 1e-3, seed, out), val_every=steps // 20)
start = time.time()
result = run_finetune(config, train)
summary = {"task": task, "method": method, "options": options, "encoder_decoder": protocol,
           "steps": steps, "seed": seed, "wall": time.time() - start,
           "fit_seconds": result["fit_seconds"], "val_loss": result.get("val_loss"),
           "test": result["test"]}
with open(f"{out}/summary.json", "w") as stream:
    json.dump(summary, stream, indent=1)
print("done", task, method, steps, seed, f"{summary['wall']:.0f}s")
