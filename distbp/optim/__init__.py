"""Optimizers and learning-rate schedules."""

from .adam import Adam, AdamW
from .lr_scheduler import CosineAnnealingLR, LambdaLR, LinearWarmupLR, LRScheduler, StepLR
from .optimizer import Optimizer
from .sgd import SGD
