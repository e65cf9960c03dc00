"""Training: the run loop, epochs, steps and evaluation (``trainer``), image batches
(``batches``), checkpoints (``checkpoint``) and the metrics sink (``metrics``)."""

from prefast.training.trainer import Trainer, TrainResult, build_model, train

__all__ = ["TrainResult", "Trainer", "build_model", "train"]
