"""Optimisers: SAM and the training-step drivers."""
from .sam import SAM
from .steps import StepConfig, train_step

__all__ = ["SAM", "StepConfig", "train_step"]
