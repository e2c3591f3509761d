"""Per-thread autograd state: whether ops record a graph, and whether backward builds one.

Thread-local because the threads communication backend runs one rank per thread, each with its own
forward and backward, and `no_grad()` in one rank must not switch recording off in another.
"""

import functools
import threading


class _State(threading.local):
    def __init__(self):
        self.enabled = True  # ops record graph nodes
        self.graph = False  # a backward with create_graph=True is running: VJPs see Tensors


state = _State()


def is_grad_enabled():
    return state.enabled


class _GradMode:
    """Context manager and decorator that sets grad recording on or off and restores it."""

    def __init__(self, enabled):
        self._enabled = enabled
        self._prev = []

    def __enter__(self):
        self._prev.append(state.enabled)
        state.enabled = self._enabled
        return self

    def __exit__(self, *exc):
        state.enabled = self._prev.pop()
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with _GradMode(self._enabled):
                return fn(*args, **kwargs)

        return wrapper


def no_grad():
    """Ops inside record no graph: for evaluation and parameter updates."""
    return _GradMode(False)


def enable_grad():
    return _GradMode(True)


def set_grad_enabled(enabled):
    return _GradMode(bool(enabled))
