"""Training: the Trainer shared by pretraining, fine-tuning and the benchmark, and its parts.

One loop for every method and task: AdamW with decay/no-decay parameter groups, linear
warm-up then cosine decay, gradient accumulation and clipping, bf16 autocast on CUDA,
periodic validation, a JSONL metric log, atomic checkpoints and exact resume. Methods plug
in through hooks (:class:`TrainingHook` subclasses); the loop has no special cases for any
of them. One job per module:

- :mod:`.config`: :class:`TrainConfig` and its validation;
- :mod:`.hooks`: :class:`TrainingHook`, the points where methods plug in;
- :mod:`.optimizer`: parameter groups, AdamW and the learning-rate schedule;
- :mod:`.data_order`: which samples form which batch on which rank, in which order;
- :mod:`.batches`: moving collated batches to a device, counting their samples;
- :mod:`.rng`: seeding, private generators, RNG capture and restore;
- :mod:`.checkpoints`: what a checkpoint holds, the store that writes and reads them;
- :mod:`.divergence`: finding and reporting non-finite values;
- :mod:`.signals`: SIGTERM/SIGINT as a request to checkpoint and stop;
- :mod:`.metrics_log`: ``metrics.jsonl``;
- :mod:`.trainer`: the :class:`Trainer`: distribution, contexts, the optimizer step, the loop.

Reproducibility: python, numpy and torch are seeded from ``TrainConfig.seed``; the data
order of epoch e is a permutation drawn from its own generator seeded by (seed, e), so the
position in the data is two integers (epoch, batches consumed) that a checkpoint records
with every RNG state. Validation and evaluation run under a forked RNG, so they never
change the training trajectory. On CPU, N steps straight and N/2 + resume + N/2 give
bit-identical weights.

Faults. Preemption: SIGTERM or SIGINT during the training loop of :meth:`Trainer.fit` lets
the current optimizer step finish, checkpoints it and raises :class:`TrainingInterrupted`;
``fit(resume=True)`` then continues exactly. Checkpoints are written atomically, so a kill
mid-save keeps the previous one. Divergence: a non-finite loss or gradient norm never
reaches ``optimizer.step()``; ``TrainConfig.on_nonfinite`` either stops with a
:class:`DivergenceError` that says where the first non-finite value came from, or skips the
update; a checkpoint of non-finite weights is refused.
"""

from weatherpeft.training.batches import move_to
from weatherpeft.training.checkpoints import CHECKPOINT_FORMAT, latest_checkpoint, load_model_state
from weatherpeft.training.config import TrainConfig
from weatherpeft.training.data_order import epoch_permutation
from weatherpeft.training.divergence import DivergenceError
from weatherpeft.training.hooks import TrainingHook
from weatherpeft.training.metrics_log import METRICS_FILE
from weatherpeft.training.optimizer import default_param_groups, lr_factor
from weatherpeft.training.rng import seed_everything
from weatherpeft.training.signals import STOP_SIGNALS, TrainingInterrupted
from weatherpeft.training.trainer import Trainer

__all__ = [
    "CHECKPOINT_FORMAT",
    "METRICS_FILE",
    "STOP_SIGNALS",
    "DivergenceError",
    "TrainConfig",
    "Trainer",
    "TrainingHook",
    "TrainingInterrupted",
    "default_param_groups",
    "epoch_permutation",
    "latest_checkpoint",
    "load_model_state",
    "lr_factor",
    "move_to",
    "seed_everything",
]
