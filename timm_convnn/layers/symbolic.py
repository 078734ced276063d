""" Sizes of a graph exported for every image size.

``torch.export`` with a dynamic image size traces the model once with symbolic sizes (the token count of every
layer is an expression of the input's height and width) and the graph then serves every size. Python control flow on
such a size becomes a guard, an assertion the exported graph checks at run time, so the layers must not branch or loop
on it: the PyTorch path then takes all queries in one score slice and aggregates slot by slot, keeps K neighbour
slots at every size and leaves the ones without a candidate empty where eager clamps K (``slots``,
``functional._empty_slots``), and the candidate list keeps min(r, n) ids. The fused kernels' ops (GPU) assert
instead that K fits (``kept``). The helpers here are TorchScript compatible: scripted, no size is symbolic.
"""
import torch

__all__ = ['capturing', 'size_free', 'slots', 'kept', 'sym_min', 'sym_max', 'sym_round']


def capturing() -> bool:
    """Whether a graph is being captured (``torch.jit.trace``, which timm's ONNX export uses; ``torch.compile``;
    ``torch.export``): what runs now is recorded to run again later, at other inputs."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def size_free(n: int) -> bool:
    """Whether ``n`` is a symbolic size of a graph being exported for every value of it (see the module docstring)."""
    if torch.jit.is_scripting():
        return False
    return _exporting_symbolic(n)


@torch.jit.unused
def _exporting_symbolic(n: int) -> bool:
    # torch 2.5 has no is_exporting: any symbolic capture (export, or torch.compile with dynamic shapes) counts there
    exporting = getattr(torch.compiler, 'is_exporting', torch.compiler.is_compiling)
    return isinstance(n, torch.SymInt) and exporting()


def slots(num_neighbors: int, num_candidates: int) -> int:
    """Neighbour slots per query: K clamped to the candidate count, or K itself for a size-free count (the PyTorch
    path leaves the slots without a candidate empty, ``functional._empty_slots``; the fused ops assert, ``kept``)."""
    return num_neighbors if size_free(num_candidates) else min(num_neighbors, num_candidates)


def kept(num_neighbors: int, num_candidates: int) -> int:
    """``slots`` for the fused kernels' ops. In a size-free graph they keep K and assert at least K candidates where
    the graph runs (torch reports "Guard failed: <candidate count> >= K")."""
    if size_free(num_candidates):
        _check_at_least(num_candidates, num_neighbors)
    return slots(num_neighbors, num_candidates)


@torch.jit.unused
def _check_at_least(n: int, minimum: int) -> None:
    torch._check(n >= minimum)


def sym_min(a: int, b: int) -> int:
    """min(a, b) with no guard when either is symbolic."""
    if torch.jit.is_scripting():
        return min(a, b)
    return _sym_min(a, b)


def sym_max(a: int, b: int) -> int:
    """max(a, b) with no guard when either is symbolic."""
    if torch.jit.is_scripting():
        return max(a, b)
    return _sym_max(a, b)


def _symbolic(*values) -> bool:
    # (plain ints take the builtins: under torch.jit.trace sizes may be tensors, which torch.sym_min refuses)
    return any(isinstance(v, (torch.SymInt, torch.SymFloat)) for v in values)


@torch.jit.unused
def _sym_min(a: int, b: int) -> int:
    return torch.sym_min(a, b) if _symbolic(a, b) else min(a, b)


@torch.jit.unused
def _sym_max(a: int, b: int) -> int:
    return torch.sym_max(a, b) if _symbolic(a, b) else max(a, b)


def sym_round(x: float) -> int:
    """round(x) to an int, symbolic when x is (``int()`` would specialise it)."""
    if torch.jit.is_scripting():
        return int(round(x))
    return _sym_round(x)


@torch.jit.unused
def _sym_round(x: float) -> int:
    return round(x) if _symbolic(x) else int(round(x))
