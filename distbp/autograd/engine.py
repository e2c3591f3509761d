"""The reverse-mode engine: runs the graph's VJPs from the outputs back to the leaves.

Order: every node gets a creation number, and a node is always created after the nodes it reads, so
visiting the reachable nodes in decreasing creation number is a topological order, found without
recursion (a chain of any depth works). A leaf's gradient is final once its last consumer has run: the
engine counts each leaf's incoming edges, and when the count reaches zero it stores `.grad` and fires the
leaf's post-accumulate hooks at once, while the rest of backward is still running (data parallelism
starts communicating there).

A leaf may name an array to receive its gradient (Tensor.set_grad_destination; data parallelism points
parameters into its flat all-reduce buckets). When a node is the only contributor to such a leaf's fresh
gradient, the engine offers the array to the node's backward (`ctx.grad_out(i)`); an op that computes
that gradient with `out=` saves the copy into the bucket, and `.grad` becomes a Tensor over the array.

The engine, not the ops, owns three rules:
  - contributions to a node used several times are summed, never overwritten;
  - a gradient is reduced to its input's broadcast shape and cast to its input's dtype (`sum_to` below);
  - saved values and intermediate gradients are dropped as soon as a node has run (unless retain_graph).
"""

import numpy as np

from .grad_mode import state
from .tensor import Tensor

_ndarray = np.ndarray


def sum_to(g, shape):
    """Sum a broadcast gradient back down to `shape` (works on ndarrays and on Tensors)."""
    if g.shape == shape:
        return g
    if g.dtype == np.float16 and isinstance(g, _ndarray):  # summed in float32: a float16 running sum stalls
        return sum_to(g.astype(np.float32), shape).astype(np.float16)
    lead = g.ndim - len(shape)
    if lead < 0:
        raise RuntimeError(f"gradient of shape {g.shape} cannot be reduced to the input's shape {shape}")
    if lead:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    if g.shape != shape:
        raise RuntimeError(f"gradient of shape {g.shape} does not fit the input's shape {shape}")
    return g


def _seed(root, grad, create_graph):
    if not root.requires_grad:
        raise RuntimeError(
            "backward on a tensor that does not require grad: none of the tensors it was computed "
            "from has requires_grad=True (or it was computed under no_grad())"
        )
    if grad is None:
        if root.data.size != 1:
            raise RuntimeError(
                f"backward on a tensor of shape {root.data.shape} needs a gradient of that shape: "
                "only a one-element output gets 1 as its gradient by default"
            )
        seed = np.ones(root.data.shape, root.data.dtype) if root.data.ndim else np.array(1, root.data.dtype)
    else:
        if type(grad) in (int, float):  # a Python number takes the output's dtype (a numpy scalar keeps its own)
            arr = np.asarray(grad, root.data.dtype)
        else:
            arr = grad.data if isinstance(grad, Tensor) else np.asarray(grad)
        if arr.shape != root.data.shape:
            raise ValueError(
                f"backward: the gradient has shape {arr.shape} but the output has shape {root.data.shape}"
            )
        if arr.dtype != root.data.dtype:
            raise TypeError(
                f"backward: the gradient has dtype {arr.dtype} but the output has dtype {root.data.dtype}"
            )
        if create_graph and isinstance(grad, Tensor):
            return grad
        seed = arr
    return Tensor(seed, dtype=seed.dtype) if create_graph else seed


def _run_hooks(hooks, g):
    for hook in hooks:
        replaced = hook(g)
        if replaced is None:
            continue
        if isinstance(g, _ndarray) and isinstance(replaced, Tensor):
            replaced = replaced.data  # plain backward computes on arrays
        elif isinstance(g, Tensor) and isinstance(replaced, _ndarray):
            replaced = Tensor._from_op(replaced, None)  # create_graph backward computes on Tensors
        if not isinstance(replaced, (_ndarray, Tensor)):
            raise TypeError(f"the hook {_hook_name(hook)} returned a {type(replaced).__name__}; "
                            "a hook returns the gradient (an array) or None")
        if replaced.shape != g.shape or replaced.dtype != g.dtype:
            raise ValueError(f"the hook {_hook_name(hook)} changed the gradient from {g.dtype}{list(g.shape)} to "
                             f"{replaced.dtype}{list(replaced.shape)}; a hook may change its values only")
        g = replaced
    return g


def _hook_name(hook):
    return getattr(hook, "__qualname__", None) or repr(hook)


def backward(roots, grads=None, retain_graph=None, create_graph=False, inputs=None, allow_unused=False):
    """Backpropagate from `roots`.

    Without `inputs`: accumulate into every reachable leaf's `.grad` (Tensor.backward).
    With `inputs`: return their gradients instead and leave every `.grad` untouched (autograd.grad);
    an input not reached gets None if allow_unused, else an error.
    """
    if retain_graph is None:
        retain_graph = create_graph
    if grads is None:
        grads = [None] * len(roots)
    if len(grads) != len(roots):
        raise ValueError(f"backward: {len(roots)} outputs but {len(grads)} gradients")

    # Which node or leaf each requested input's gradient is read at.
    targets = None
    if inputs is not None:
        targets = {}
        for i, t in enumerate(inputs):
            if not isinstance(t, Tensor) or not t.requires_grad:
                raise RuntimeError(f"grad: input {i} is not a tensor that requires grad")
        keys = [t if t._node is None else t._node for t in inputs]
        for i, key in enumerate(keys):
            targets.setdefault(key, i)
        first_of = [targets[key] for key in keys]  # an input listed twice: its first listing's index
        captured = [None] * len(inputs)

    # Seeds and discovery of the reachable graph (iterative, no recursion).
    nodes = []
    seen = set()
    leaf_edges = {}
    leaf_grads = {}
    for root, grad in zip(roots, grads):
        seed = _seed(root, grad, create_graph)
        node = root._node
        if node is None:  # the output is itself a leaf
            leaf_edges[root] = leaf_edges.get(root, 0) + 1
            prev = leaf_grads.get(root)
            leaf_grads[root] = seed if prev is None else prev + seed
            continue
        if node.parents is None:
            raise RuntimeError(_FREED)
        node.grad_acc = seed if node.grad_acc is None else node.grad_acc + seed
        if node not in seen:
            seen.add(node)
            nodes.append(node)
    stack = list(nodes)
    while stack:
        node = stack.pop()
        for p in node.parents:
            if p is None:
                continue
            if p._is_node:
                if p not in seen:
                    if p.parents is None:
                        raise RuntimeError(_FREED)
                    seen.add(p)
                    nodes.append(p)
                    stack.append(p)
            else:
                leaf_edges[p] = leaf_edges.get(p, 0) + 1
    nodes.sort(key=_creation_order, reverse=True)

    # ids of arrays that may be referenced elsewhere (a seed, a gradient passed through an op unchanged,
    # one already stored as a leaf's .grad): such an array is copied before it becomes a .grad.
    shared = {id(g) for g in leaf_grads.values()}
    for node in nodes:
        if node.grad_acc is not None:
            shared.add(id(node.grad_acc))

    # Offer gradient destinations only where a gradient starts afresh in plain backward.
    offer = targets is None and not create_graph and any(
        leaf._grad_dest is not None for leaf in leaf_edges)

    def finish_leaf(leaf, g):
        if leaf._hooks:
            g = _run_hooks(leaf._hooks, g)
        if targets is not None:
            i = targets.get(leaf)
            if i is not None:
                captured[i] = g
            return
        if create_graph:
            leaf.grad = g if leaf.grad is None else leaf.grad + g
        else:
            if g.__class__ is not _ndarray:
                g = np.asarray(g)
            if leaf.grad is None:
                # .grad must own its memory: users, optimizers and all-reduce write into it in place
                # (the leaf's own destination is memory set aside for exactly that).
                if g is leaf._grad_dest:
                    pass
                elif g.base is not None or id(g) in shared or not g.flags.writeable:
                    g = g.copy()
                shared.add(id(g))
                leaf.grad = Tensor._from_op(g, None)
            elif leaf.grad.requires_grad or not leaf.grad.data.flags.writeable:
                leaf.grad = Tensor._from_op(leaf.grad.data + g, None)
            else:
                leaf.grad.data += g
        if leaf._post_hooks:
            for hook in leaf._post_hooks:
                hook(leaf)

    saved_graph, saved_enabled = state.graph, state.enabled
    state.graph = create_graph
    state.enabled = create_graph
    try:
        # An output that is itself a leaf has delivered its one contribution already.
        for leaf in list(leaf_grads):
            leaf_edges[leaf] -= 1
            if leaf_edges[leaf] == 0:
                finish_leaf(leaf, leaf_grads.pop(leaf))
        for node in nodes:
            g = node.grad_acc
            node.grad_acc = None
            parents = node.parents
            if g is None:  # nothing flowed here; the leaves below still count this edge as done
                results = (None,) * len(parents)
            else:
                if node.hooks:
                    g = _run_hooks(node.hooks, g)
                if targets is not None:
                    i = targets.get(node)
                    if i is not None:
                        captured[i] = g if captured[i] is None else captured[i] + g
                if offer:
                    dests = None
                    for i, p in enumerate(parents):
                        if (p is not None and not p._is_node and p._grad_dest is not None and p.grad is None
                                and leaf_edges[p] == 1 and p not in leaf_grads and not p._hooks):
                            if dests is None:
                                dests = [None] * len(parents)
                            dests[i] = p._grad_dest
                    node.grad_dests = dests
                results = node.backward(node, g)
                node.grad_dests = None
                if len(results) != len(parents):
                    raise RuntimeError(
                        f"{node.name}.backward returned {len(results)} gradients for {len(parents)} inputs"
                    )
            for p, gi in zip(parents, results):
                if p is None:
                    continue
                if p._is_node:
                    if gi is None:
                        continue
                    if gi.shape != p.shape:
                        gi = sum_to(gi, p.shape)
                    if gi.dtype is not p.dtype and gi.dtype != p.dtype:
                        gi = gi.astype(p.dtype)
                    if gi is g:
                        shared.add(id(g))
                    acc = p.grad_acc
                    p.grad_acc = gi if acc is None else acc + gi
                    continue
                if gi is not None:
                    data = p.data
                    if gi.shape != data.shape:
                        gi = sum_to(gi, data.shape)
                    if gi.dtype is not data.dtype and gi.dtype != data.dtype:
                        gi = gi.astype(data.dtype)
                    if gi is g:
                        shared.add(id(g))
                    acc = leaf_grads.get(p)
                    leaf_grads[p] = gi if acc is None else acc + gi
                left = leaf_edges[p] - 1
                leaf_edges[p] = left
                if left == 0 and p in leaf_grads:
                    finish_leaf(p, leaf_grads.pop(p))
            if not retain_graph:
                node.release()
    except BaseException:
        for node in nodes:
            node.grad_acc = None
            node.grad_dests = None  # a node that raised must not keep its offer for a later backward
        raise
    finally:
        state.graph, state.enabled = saved_graph, saved_enabled

    if targets is not None:
        for t, i in targets.items():
            if captured[i] is None and not allow_unused:
                raise RuntimeError(
                    f"grad: input {i} was not used to compute the outputs (pass allow_unused=True)"
                )
        for i, first in enumerate(first_of):
            if first != i and captured[first] is not None:  # its own copy: each result may be changed in place
                captured[i] = captured[first] if create_graph else np.array(captured[first])
        if not create_graph:
            return [None if c is None else Tensor._from_op(np.asarray(c), None) for c in captured]
        return captured
    return None


_FREED = (
    "backward through a graph that has already been freed: its saved values were released by an earlier "
    "backward; pass retain_graph=True to that backward to run through the graph again"
)


def _creation_order(node):
    return node.seq


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, allow_unused=False):
    """The gradients of `outputs` with respect to `inputs`, returned rather than stored in `.grad`.

    With create_graph=True the returned gradients are themselves differentiable (gradients of gradients).
    """
    single_out = isinstance(outputs, Tensor)
    outputs = [outputs] if single_out else list(outputs)
    single_in = isinstance(inputs, Tensor)
    inputs = [inputs] if single_in else list(inputs)
    if grad_outputs is not None:
        grad_outputs = [grad_outputs] if isinstance(grad_outputs, (Tensor, np.ndarray)) else list(grad_outputs)
    result = backward(outputs, grad_outputs, retain_graph, create_graph, inputs, allow_unused)
    return result[0] if single_in else tuple(result)
