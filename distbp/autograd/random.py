"""The one random source behind initialisation and dropout, seeded by `manual_seed`.

Per thread, so that ranks simulated by threads draw independent, reproducible streams.
"""

import threading

import numpy as np

_local = threading.local()

# One seed, several purposes, kept apart. numpy pads a seed list with zeros, so default_rng(s) and
# default_rng([s, 0, 0]) are one generator: manual_seed(seed) initialises the model, and every other
# purpose's seed differs from it, and from the others, in its second place.
SHUFFLE_STREAM = 1  # the data order of each epoch: [seed, SHUFFLE_STREAM, epoch]
DROPOUT_STREAM = 2  # each rank's dropout: [seed, DROPOUT_STREAM, rank]


def manual_seed(seed):
    """Seed this thread's generator (initialisation, dropout); returns it."""
    _local.rng = np.random.default_rng(seed)
    return _local.rng


def default_rng():
    rng = getattr(_local, "rng", None)
    if rng is None:
        rng = _local.rng = np.random.default_rng()
    return rng


def get_rng_state():
    """The generator's state as a JSON-friendly dict (for checkpoints)."""
    return default_rng().bit_generator.state


def set_rng_state(state):
    default_rng().bit_generator.state = state


def check_rng_state(state):
    """Raise ValueError unless set_rng_state(state) would take it; changes nothing."""
    probe = type(default_rng().bit_generator)(0)  # a throwaway generator of the same kind
    try:
        probe.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise ValueError(f"not a {type(probe).__name__} generator state ({type(e).__name__}: {e})") from None
