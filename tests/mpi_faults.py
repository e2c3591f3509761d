"""Run under mpiexec by test_mpi.py: distbp training in which rank 1 fails at step 3 in a chosen way."""

import os
import signal
import sys
import time

from distbp.train import make_config
from distbp.train import trainer as trainer_module
from distbp.train.launch import run

kind = sys.argv[1]
original = trainer_module.Trainer._train_step


def faulty(self, x, y):
    if self.strategy.rank == 1 and self.step == 3:
        if kind == "raise":
            raise RuntimeError("injected failure on rank 1")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            time.sleep(120)
    return original(self, x, y)


trainer_module.Trainer._train_step = faulty
run(make_config({"backend": "mpi", "epochs": 2, "progress": "none", "timeout": 3.0}))
