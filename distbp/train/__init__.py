"""The training service: configuration, the one training loop, checkpoints, progress and metrics."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import FIELDS, Config, ConfigError, load_toml, make_config
from .progress import MetricsLog, Progress, plot_metrics, read_metrics
from .trainer import LocalStep, Trainer, build_data, build_model, build_optimizer, build_schedule
