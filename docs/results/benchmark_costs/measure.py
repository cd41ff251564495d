"""Per-run costs for the benchmark's cost model: step, validation and set-up/test-evaluation time.

    python docs/results/benchmark_costs/measure.py OUT TASK PROTOCOL STEPS METHOD[|OPTIONS] ...

Each run is the benchmark's Trainer protocol (batch 2, lr 1e-3, new_lr 6e-3, budget 0.3 %)
for STEPS steps with the validation loss (4 batches) every STEPS/2 steps, 1 torch thread.
Appends one JSON line per run to OUT/costs.jsonl: wall, fit, validation and test-evaluation
seconds, and the machine's load average at the start and the end.
"""
import dataclasses
import json
import logging
import os
import sys
import time

import torch

from weatherpeft.benchmark import training_protocol
from weatherpeft.finetune import FinetuneConfig, run_finetune
from weatherpeft.train import Trainer

torch.set_num_threads(1)
logging.basicConfig(level=logging.WARNING)
out, task, protocol, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
timings: dict[str, float] = {"validate": 0.0, "evaluate": 0.0, "validations": 0}


def timed(name, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timings[name] += time.perf_counter() - start
            if name == "validate":
                timings["validations"] += 1
    return wrapper


Trainer.validate = timed("validate", Trainer.validate)
Trainer.evaluate = timed("evaluate", Trainer.evaluate)
for spec in sys.argv[5:]:
    method, _, options = spec.partition("|")
    timings.update(validate=0.0, evaluate=0.0, validations=0)
    folder = f"{out}/{task}_{protocol}_{method}{'_' + str(abs(hash(options)) % 1000) if options else ''}"
    config = FinetuneConfig(task=task, method=method, budget=0.003, options=options or "{}", new_lr=6e-3,
                            threads=1, encoder_decoder=protocol)
    train = dataclasses.replace(training_protocol(steps, 2, 1e-3, 0, folder), val_every=steps // 2,
                                val_batches=4)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        result = run_finetune(config, train)
    except Exception as error:  # a method that cannot reach the budget: say so and go on
        print(json.dumps({"task": task, "method": method, "error": str(error)}), flush=True)
        continue
    wall = time.perf_counter() - start
    row = {"task": task, "protocol": protocol, "method": method, "options": options, "steps": steps,
           "wall": wall, "fit": result["fit_seconds"], "validate": timings["validate"],
           "validations": timings["validations"], "evaluate": timings["evaluate"],
           "trainable": result["report"]["trainable"], "stored": result["report"]["stored"],
           "load_start": load, "load_end": os.getloadavg()[0]}
    row["step"] = (row["fit"] - row["validate"] * (row["validations"] - 1) / max(row["validations"], 1)) / steps
    with open(f"{out}/costs.jsonl", "a") as stream:
        stream.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
