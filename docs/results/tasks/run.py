"""Exploration runner: python run.py VARIANT METHOD STEPS SEED OUT [OPTIONS_JSON] [TASK_KWARGS_JSON] [PROTOCOL] [LRS_JSON]

LRS_JSON: {"lr": pretrained entries (default 1e-3), "encoder_decoder_lr": under train (default lr)}."""
import json
import logging
import sys
import time

import torch

torch.set_num_threads(1)
from weatherpeft import tasks
from weatherpeft.benchmark import training_protocol
from weatherpeft.finetune import FinetuneConfig, run_finetune

variant, method, steps, seed, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
options = sys.argv[6] if len(sys.argv) > 6 else "{}"
kwargs = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
base = {"ds": "downscaling", "pp": "postprocessing", "pr": "precipitation"}[variant[:2]]
if kwargs:
    def build(data, stats, *, grid=None, _base=base):
        if _base == "downscaling":
            from weatherpeft.tasks.downscaling import DownscalingTask as T
        elif _base == "postprocessing":
            from weatherpeft.tasks.postprocessing import PostprocessingTask as T
        else:
            from weatherpeft.tasks.precipitation import PrecipitationTask as T
        kw = dict(kwargs)
        store = kw.pop("store", None)
        return T(store, None, stats, **kw)
    tasks.register_task(base, build, replace=True)
logging.basicConfig(level=logging.WARNING)
protocol = sys.argv[8] if len(sys.argv) > 8 else "frozen"
lrs = json.loads(sys.argv[9]) if len(sys.argv) > 9 else {}
cfg = FinetuneConfig(task=base, method=method, budget=0.003, options=options, new_lr=6e-3, threads=1, encoder_decoder=protocol,
                     encoder_decoder_lr=lrs.get("encoder_decoder_lr", 0.0))
train = training_protocol(steps, 2, lrs.get("lr", 1e-3), seed, out)
t0 = time.time()
result = run_finetune(cfg, train)
wall = time.time() - t0
json.dump({"protocol": protocol, "lrs": lrs, "val_loss": result.get("val_loss"), "variant": variant, "kwargs": kwargs, "method": method, "options": options, "steps": steps,
           "seed": seed, "wall": wall, "fit_seconds": result["fit_seconds"], "test": result["test"]},
          open(out + "/summary.json", "w"), indent=1)
print("done", variant, method, steps, seed, f"{wall:.0f}s")
