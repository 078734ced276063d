""" Which implementation ConvNN layers run: the PyTorch path (every device, the reference) or the fused Triton
kernels (CUDA). ``TIMM_CONVNN_BACKEND`` sets the start value; ``set_backend`` changes it at run time.

Two kernels can serve a layer:
* the fused attention forward and backward (``ConvNNAttention``): every token a candidate or a sampled list
  (``random`` / ``spatial``), softmax weights, depthwise aggregation, rank order, K <= 64, attention dropout (in
  training) by ``nn.Dropout`` if any, not under ``torch.use_deterministic_algorithms(True)``, nothing hooked on the
  layer's aggregation;
* otherwise, the top-K selection alone (``ConvNN2d``, and attention layers the forward does not cover): every token or
  a sampled list a candidate, fp32 / half / bf16 similarity features of at most 128 channels, K <= 64. It replaces the
  score matrix and ``torch.topk``; weights and aggregation stay in PyTorch (selection has no gradient, and no atomics:
  it is deterministic).

* ``auto`` (default): those kernels for CUDA tensors; PyTorch otherwise.
* ``torch``: always the PyTorch path.
* ``triton``: those kernels wherever they apply, CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, for
  testing) included; an error when Triton cannot run on the input's device.
"""
import os

__all__ = ['set_backend', 'get_backend', 'BACKENDS']

BACKENDS = ('auto', 'torch', 'triton')
_backend = [os.environ.get('TIMM_CONVNN_BACKEND', 'auto').strip().lower() or 'auto']
_from_environment = [True]  # whether the value is the environment's (set_backend not called since)


def _check(name: str, source: str = '') -> str:
    if name not in BACKENDS:
        raise ValueError(f'ConvNN backend must be one of {", ".join(BACKENDS)}; got {name!r}{source}')
    return name


def set_backend(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f'set_backend takes one of {", ".join(BACKENDS)}; got {type(name).__name__} {name!r}')
    _backend[0] = _check(name.strip().lower())
    _from_environment[0] = False


def get_backend() -> str:
    source = ' (from the TIMM_CONVNN_BACKEND environment variable)' if _from_environment[0] else ''
    return _check(_backend[0], source)
