"""Data parallelism: DataParallel averages gradients over ranks with bucketed all-reduce during backward."""

from .data_parallel import DataParallel, ModelMismatch, UnusedParameters
