"""`Function`: the base of every primitive op, and the graph node it leaves behind.

An op subclasses Function with two static methods, in the style of PyTorch's autograd.Function:

    forward(ctx, *arrays, **options) -> ndarray    computes on numpy arrays
    backward(ctx, grad) -> tuple of input grads    the vector-Jacobian product (VJP)

`Op.apply(*tensors, **options)` runs forward and, when some input requires a gradient and grad mode is
on, keeps the ctx as the output's graph node. The ctx *is* the node: it holds the parents (one per
input: the producing node, the leaf tensor itself, or None where no gradient is needed), whatever
forward saved, and a creation number used by the engine to order work.

Each backward is written once, against `ctx.inputs`, `ctx.out` and the namespace `xp()`, and runs in two
modes chosen by the engine:
  - plain backward: inputs/out are ndarrays and `xp()` is numpy: no graph, no Tensor wrappers;
  - create_graph backward: inputs/out are Tensors and `xp()` is distbp's own differentiable ops, so the
    gradient is itself a graph and can be differentiated again.
"""

import itertools

import numpy as np

from .grad_mode import state

_creation = itertools.count()
_ndarray = np.ndarray


class Function:
    __slots__ = ("parents", "seq", "shape", "dtype", "saved", "hooks", "grad_acc", "grad_dests", "_inputs", "_out",
                 "_versions", "_out_version")

    _is_node = True
    save_inputs = False  # forward's input Tensors are kept for backward (as ctx.inputs)
    save_output = False  # forward's output is kept for backward (as ctx.out)
    output_views_input = False  # forward may return a view of its first input's array (reshape, slicing)

    @staticmethod
    def forward(ctx, *arrays, **options):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **options):
        ctx = cls.__new__(cls)
        out = cls.forward(ctx, *[t.data for t in inputs], **options)
        if out.__class__ is not _ndarray:
            out = np.asarray(out)  # numpy reductions hand back scalars; a Tensor always holds an array
        node = None
        if state.enabled:
            parents = []
            for t in inputs:
                if t.requires_grad:
                    node = ctx
                    parents.append(t if t._node is None else t._node)
                else:
                    parents.append(None)
        result = _Tensor._from_op(out, node)
        if cls.output_views_input and np.may_share_memory(out, inputs[0].data):
            result._version = inputs[0]._shared_version()
        if node is not None:
            ctx.parents = parents
            ctx.seq = next(_creation)
            ctx.shape = out.shape
            ctx.dtype = out.dtype
            ctx.hooks = None
            ctx.grad_acc = None
            ctx.grad_dests = None
            # What backward reads, with the versions it had (checked by input_arrays and out_array).
            if cls.save_inputs:
                ctx._inputs = inputs
                ctx._versions = [0 if t._version is None else t._version[0] for t in inputs]
            else:
                ctx._inputs = None
            if cls.save_output:
                ctx._out = out
                box = result._shared_version()
                ctx._out_version = (box, box[0])
            else:
                ctx._out = None
        return result

    # --- what backward reads -----------------------------------------------------------------------

    def needs(self, i):
        """Whether input i needs a gradient (backward may skip computing the others)."""
        return self.parents[i] is not None

    def grad_out(self, i):
        """The array input i's gradient may be written into (see Tensor.set_grad_destination), or None.

        The engine offers one only in plain backward, when this node is the leaf's sole contributor; a
        backward that can compute that gradient with `out=` writes it there and returns that very array.
        """
        dests = self.grad_dests
        return None if dests is None else dests[i]

    @property
    def inputs(self):
        arrays = self.input_arrays
        return self._inputs if state.graph else arrays

    @property
    def input_arrays(self):
        """The saved inputs' arrays in either mode (for constants such as masks), checked like `inputs`."""
        for i, (t, saved) in enumerate(zip(self._inputs, self._versions)):
            if (0 if t._version is None else t._version[0]) != saved:
                raise RuntimeError(self._changed(f"its input {i}", t.data, t._version[0], saved))
        return [t.data for t in self._inputs]

    @property
    def out_array(self):
        """The saved output's array in either mode, refused if it was changed in place since forward."""
        box, saved = self._out_version
        if box[0] != saved:
            raise RuntimeError(self._changed("its output", self._out, box[0], saved))
        return self._out

    @property
    def out(self):
        out = self.out_array
        if state.graph:
            # A new Tensor over the same array whose node is this one: gradients flowing into it in a
            # later backward reach this node, exactly as through the original output.
            return _Tensor._from_op(out, self)
        return out

    def _changed(self, what, array, version, saved):
        return (
            f"{self.name} needs {what} (shape {list(array.shape)}, {array.dtype}) to compute gradients, but it was "
            f"changed in place after {self.name} used it (it is at version {version}, {self.name} saw version "
            f"{saved}): change a copy instead, or change it only after backward"
        )

    @property
    def freed(self):
        return self.parents is None

    def release(self):
        """Drop saved values once backward has used them (and mark the node as spent)."""
        self.parents = None
        self._inputs = None
        self._out = None
        self._versions = None
        self._out_version = None
        self.saved = None

    @property
    def name(self):
        return type(self).__name__

    def __repr__(self):
        return f"<{self.name} node #{getattr(self, 'seq', '?')}>"


_Tensor = None  # set by tensor.py, which imports this module


def _bind_tensor(cls):
    global _Tensor
    _Tensor = cls
