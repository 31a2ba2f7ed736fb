"""Deprojector training: any CLIP text encoder plus captions -> a deprojector checkpoint.

  train(TrainOptions(...)) -> TrainResult       one run (resumable), see run.py
  train_or_reuse(model_source, out_dir, ...)    the checkpoint dir, trained only when needed

Modules: augment (split/combine plan), encode + cache (CLIP pairs on disk), pairs + loss
(tensors, weighted MSE), teacher (teacher-forced pass), loop (Adam, evaluation, early
stopping), state (resume files), data (captions -> pairs), run (the whole run).
"""

from export.training.run import TRAINABLE, TrainOptions, TrainResult, train, train_or_reuse

__all__ = ["TRAINABLE", "TrainOptions", "TrainResult", "train", "train_or_reuse"]
