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
