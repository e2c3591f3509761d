import subprocess

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def tiny_charlm(tmp_path):
    """Training options of a charlm small enough to train in a second, on a made-up corpus, with dropout."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"x{i % 7} = {i}\n" for i in range(600)))
    return dict(model="charlm", text_file=str(corpus), block_size=16, d_model=16, n_heads=2, n_layers=1,
                dropout=0.2, epochs=2, batch_size=8, sample_length=0)


@pytest.fixture
def signal_when_training():
    """signal_when_training(command, signal, cwd=None) -> (exit code, stderr): start `command` (a training run
    with progress lines on stdout), send the signal once the first step is logged, wait at most 30 s."""

    def run(command, sent, cwd=None):
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            while "step" not in proc.stdout.readline():  # training has begun
                assert proc.poll() is None, proc.stderr.read()
            proc.send_signal(sent)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return proc.returncode, err

    return run
