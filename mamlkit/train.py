"""The training harness: meta-training, Adam, clipping, checkpoints and evaluation.

- :func:`meta_train` — Adam meta-training of any method of :data:`mamlkit.METHODS`, seeded,
  with periodic atomic checkpoints, bit-identical resume, and SIGINT/SIGTERM handling;
  :class:`TrainConfig` and :func:`run_training` — the same with the settings as one frozen value;
- :class:`Adam`, :class:`AdamState`, :func:`adam_init`, :func:`adam_update`,
  :func:`clip_global_norm` — the optimizer as a value and as pure functions on dicts;
- :class:`Checkpoint`, :func:`save_checkpoint`, :func:`load_checkpoint` — one file per run;
- :func:`evaluate`, :func:`mean_ci95` — fine-tuning curves on held-out tasks with 95 % intervals.
"""

from ._checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from ._evaluate import EvalResult, evaluate, mean_ci95
from ._optim import (
    Adam,
    AdamState,
    CosineSchedule,
    TorchOptimizer,
    adam_init,
    adam_update,
    clip_global_norm,
)
from ._train import (
    AUTO_COMPILE_ITERATIONS,
    Progress,
    TaskSampler,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    TrainResult,
    meta_train,
    run_training,
    trained,
)

__all__ = [
    "AUTO_COMPILE_ITERATIONS",
    "Adam",
    "AdamState",
    "Checkpoint",
    "CheckpointError",
    "CosineSchedule",
    "EvalResult",
    "Progress",
    "TaskSampler",
    "TorchOptimizer",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "adam_init",
    "adam_update",
    "clip_global_norm",
    "evaluate",
    "load_checkpoint",
    "mean_ci95",
    "meta_train",
    "run_training",
    "save_checkpoint",
    "trained",
]
