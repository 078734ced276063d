""" Benchmark harness: ConvNN against SDPA / timm's own models, as ratios measured in the same run.

    timm-convnn bench --ops                    # operator level: ConvNN vs SDPA vs the paper-style implementation
    timm-convnn bench --models                 # model level: train step and inference of convnn vs timm models
    timm-convnn bench --ops --models --device cuda --amp --compile --out bench-out/

Operator level: the ConvNN-attention core (``ConvNNAttention.convnn_mix``: similarity, top-K selection, softmax over
the K kept scores, depthwise aggregation; the code the models run) against ``F.scaled_dot_product_attention`` and
against ``paper_convnn_attention`` (the paper's algorithm written as the authors' code does: dense scores, K-fold
copies of V, gather, Conv1d), forward and forward + backward, over token counts n, K and candidate modes. Model level:
inference and train-step (forward, backward, SGD step) throughput and peak memory.

Time: median of timed iterations after warm-up (CUDA: synchronised). Memory: CUDA peak allocated bytes during the
call; CPU peak bytes of live tensors created during the call (a dispatch-level tensor tracker: exact tensor bytes,
no allocator overhead), both above what existed before. Output: JSON (every number + environment), a markdown table
and a PNG plot of time vs n (matplotlib, the ``viz`` extra).
"""
import argparse
import datetime
import json
import math
import platform
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['paper_convnn_attention', 'measure', 'op_benchmark', 'model_benchmark', 'markdown', 'plot', 'main']


# -- the paper's algorithm, written the straightforward way ---------------------------------------------------------

def paper_convnn_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        weight: torch.Tensor,
        num_neighbors: int,
        candidates: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ConvNN attention as the authors' code computes it (for benchmarks, and an independent oracle in tests).

    Dense scores q k^T / sqrt(d) against all tokens (or the listed candidates plus the query itself), ``torch.topk``
    with autograd, softmax over the K kept scores, then the reference's data path: V expanded K-fold and made
    contiguous, the (B*H, D, N, K) index expanded over channels, gathered, weighted, and reduced by a depthwise
    ``Conv1d(kernel K, stride K)``. Semantics are this package's (q selects, k is selected; per-head; per-channel
    weights), so the output equals ``ConvNNAttention.convnn_mix`` with ``similarity='dot'``.

    q, k, v: (B, H, N, D); weight: (H, D, K) depthwise taps; candidates: optional (r,) token ids.
    """
    B, H, N, D = q.shape
    if candidates is None:
        scores = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5  # (B, H, N, N): the dense score matrix
    else:  # dense scores against the r listed candidates, plus each query's own score as the last column
        self_col = torch.arange(N, device=q.device)
        listed = torch.matmul(q, k[:, :, candidates].transpose(-1, -2)) * D ** -0.5
        listed = listed.masked_fill(candidates.view(1, -1) == self_col.view(-1, 1), float('-inf'))
        scores = torch.cat([listed, (q * k).sum(-1, keepdim=True) * D ** -0.5], dim=-1)
        ids = torch.cat([candidates.view(1, -1).expand(N, -1), self_col.view(-1, 1)], dim=1)
    kk = min(num_neighbors, scores.shape[-1])
    top, cols = scores.topk(kk, dim=-1)
    idx = cols if candidates is None else torch.gather(ids.expand(B, H, N, ids.shape[-1]), -1, cols)
    rho = top.softmax(dim=-1)  # (B, H, N, K)
    x = v.transpose(-1, -2).reshape(B * H, D, N)
    x_exp = x.unsqueeze(-1).expand(B * H, D, N, kk).contiguous()  # the K-fold copy of V
    idx_exp = idx.reshape(B * H, 1, N, kk).expand(B * H, D, N, kk)  # index expanded over channels
    gathered = torch.gather(x_exp, 2, idx_exp)  # gathered[., c, i, r] = v[., c, idx[i, r]]
    prime = gathered * rho.reshape(B * H, 1, N, kk)
    w = weight[:, :, :kk].reshape(H * D, 1, kk)
    out = F.conv1d(prime.reshape(B, H * D, N * kk), w, stride=kk, groups=H * D)  # (B, H*D, N)
    return out.view(B, H, D, N).transpose(-1, -2)


# -- measurement -----------------------------------------------------------------------------------------------------

class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensors alive at once among those created while active (CPU memory without allocator stats)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: Dict[int, List[int]] = {}  # storage ptr -> [bytes, tensor refs]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _minor_faults() -> Optional[int]:
    """This process's minor page faults so far (Unix; None elsewhere). Memory the allocator hands back to the OS
    between calls and then touches again faults in page by page, and the timings include that: on the 2-core
    development CPU glibc's malloc did so for a ``vit_tiny_convnn_all_k16`` inference forward at batch 4 (2k-27k
    faults per call from one process to the next, about 1.6 us each), never for timm's ViT (README, CPU)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, warmup: int = 2, iters: int = 5,
            memory: bool = True) -> Dict[str, Any]:
    """Median milliseconds of ``fn()``, its peak memory (bytes above the memory in use before the call) and the
    host's minor page faults per timed call (``faults``; None where not counted, see ``_minor_faults``)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    faults = _minor_faults()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    after = _minor_faults()
    times.sort()
    result = dict(ms=1000 * times[len(times) // 2], ms_min=1000 * times[0],
                  faults=None if faults is None or after is None else (after - faults) / max(1, iters))
    if memory:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            result['peak_bytes'] = torch.cuda.max_memory_allocated(device) - base
        else:
            mode = _LiveTensorBytes()
            with mode:
                fn()
            result['peak_bytes'] = mode.peak
    return result


@contextmanager
def _autocast(device: torch.device, amp: bool) -> Iterator[None]:
    if amp:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


@contextmanager
def _backend(name: str) -> Iterator[None]:
    from .layers import get_backend, set_backend
    saved = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(saved)


def _fused_layers(name: str, model_kwargs: Dict[str, Any], device: torch.device, img_size: Optional[int]) -> int:
    """How many ConvNN layers of model ``name`` run a fused kernel (the whole forward, or the top-K selection alone)
    under the current backend on ``device``, in inference or in training (whichever more): one forward of a
    meta-device build before anything is timed, every dispatch decision taken as for ``device`` and credited to the
    layer that asked, the PyTorch path run (meta tensors compute nothing)."""
    import timm
    from .layers import ConvNN2d, ConvNNAttention, triton_attention
    model = timm.create_model(name, num_classes=1000, device='meta', **model_kwargs)
    size = _input_size(model, img_size)
    decide = triton_attention.use_fused
    asking: List[Optional[torch.nn.Module]] = [None]  # the ConvNN layer whose forward runs now
    fused: set = set()

    def record(supported: bool, _device: torch.device) -> bool:
        if decide(supported, device):
            fused.add(id(asking[0]))
        return False

    def enter(module: torch.nn.Module, args) -> None:
        asking[0] = module

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules() if isinstance(m, (ConvNNAttention, ConvNN2d))]
    counts = []
    triton_attention.use_fused = record
    try:
        for training in (False, True):
            model.train(training)
            fused.clear()
            with torch.no_grad():
                model(torch.empty(2, 3, size, size, device='meta'))
            counts.append(len(fused))
    finally:
        triton_attention.use_fused = decide
        for h in hooks:
            h.remove()
    return max(counts)


def _input_size(model: torch.nn.Module, img_size: Optional[int]) -> int:
    """``img_size``, else the size a ViT was built for, else the model's default input size."""
    fixed = getattr(getattr(model, 'patch_embed', None), 'img_size', None)  # a ViT built for another size
    return img_size or (fixed[-1] if fixed else model.pretrained_cfg['input_size'][-1])


# -- operator level --------------------------------------------------------------------------------------------------

DEFAULT_TOKENS = (197, 785, 3137, 16385)
DEFAULT_BATCH = {197: 8, 785: 2, 3137: 1, 16385: 1}


def _estimate_paper_bytes(b: int, h: int, n: int, d: int, k: int, m: int, elem: int) -> int:
    # dense scores (+ their gradient and topk's scatter) and five (B*H, D, N, K) copies (expand, index, gather,
    # weighted, grads)
    return b * h * n * m * elem * 3 + b * h * d * n * k * (elem * 4 + 8)


def attention_core(n: int, heads: int, head_dim: int, num_neighbors: int, mode: str, num_samples: int,
                   device: Union[str, torch.device]) -> torch.nn.Module:
    """The ConvNN attention layer whose core (``convnn_mix``) the operator benchmark times at n tokens: a class token
    and a square patch grid of n - 1 tokens (training mode: sampled candidates are drawn afresh per call)."""
    from .layers import ConvNNAttention
    side = int(round(math.sqrt(n - 1)))
    return ConvNNAttention(heads * head_dim, num_heads=heads, num_neighbors=num_neighbors, candidates=mode,
                           num_samples=num_samples, num_prefix_tokens=1, grid_size=(side, side)).to(device)


def op_benchmark(
        device: torch.device,
        tokens: Sequence[int] = DEFAULT_TOKENS,
        neighbors: Sequence[int] = (9, 16),
        modes: Sequence[str] = ('all', 'random', 'spatial'),
        heads: int = 6,
        head_dim: int = 64,
        num_samples: int = 128,
        batch: Optional[Dict[int, int]] = None,
        amp: bool = False,
        memory_cap_bytes: int = 4 << 30,
        warmup: int = 2,
        iters: int = 5,
        backends: Sequence[str] = ('auto',),
        log: Callable[[str], None] = print,
        rows: Optional[List[Dict[str, Any]]] = None,
) -> List[Dict[str, Any]]:
    """ConvNN core vs SDPA vs the paper-style code, forward and forward+backward; one row per (impl, backend, n, K,
    mode). ``backends``: ConvNN backends to time (``timm_convnn.layers.set_backend``); each row names the one that
    ran (a case the fused kernels do not serve runs, and is timed, once). ``rows``: a list to append to as rows are
    measured (default: a new one)."""
    dtype = torch.bfloat16 if amp else torch.float32
    rows = [] if rows is None else rows
    for n in tokens:
        b = (batch or DEFAULT_BATCH).get(n, max(1, 1576 // n))  # other n: about as many tokens as 8 x 197
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(b, heads, n, head_dim, generator=g).to(device, dtype).requires_grad_()
                   for _ in range(3))
        grad_out = torch.randn(b, heads, n, head_dim, generator=g).to(device, dtype)

        def run(fn, backward):
            def call():
                with _autocast(device, amp):
                    out = fn()
                if backward:
                    out.backward(grad_out)
                    q.grad = k.grad = v.grad = None
            return call

        def record(impl, mode, kk, r, fn, backend=None):
            for backward in (False, True):
                if backward:
                    res = measure(run(fn, True), device, warmup, iters)
                else:
                    with torch.no_grad():
                        res = measure(run(fn, False), device, warmup, iters)
                row = dict(impl=impl, backend=backend, n=n, batch=b, heads=heads, head_dim=head_dim, K=kk,
                           mode=mode, num_samples=r, pass_='fwd+bwd' if backward else 'fwd', **res)
                rows.append(row)
                label = impl + (f'/{backend}' if backend else '')
                log(f'  {label:13s} n {n:6d} K {kk!s:>3} {mode:8s} {row["pass_"]:8s} {res["ms"]:9.2f} ms  '
                    f'{res["peak_bytes"] / 2 ** 20:9.1f} MiB')

        record('sdpa', 'dense', None, None, lambda: F.scaled_dot_product_attention(q, k, v))
        for kk in neighbors:
            for mode in modes:
                r = num_samples if mode != 'all' else None
                layer = attention_core(n, heads, head_dim, kk, mode, num_samples, device)
                timed = set()
                for backend in backends:
                    with _backend(backend):
                        ran = 'triton' if layer._fused_supported(n, device, q.dtype) else 'torch'
                        if ran not in timed:
                            timed.add(ran)
                            record('convnn', mode, kk, r, lambda: layer.convnn_mix(q, k, v), ran)
                m = n if mode == 'all' else num_samples + 1
                if _estimate_paper_bytes(b, heads, n, head_dim, kk, m, 4) > memory_cap_bytes:
                    log(f'  paper  n {n:6d} K {kk:3d} {mode:8s} skipped: over the {memory_cap_bytes >> 20} MiB cap')
                    continue
                cand = layer._candidate_ids(n, device) if mode != 'all' else None
                weight = layer.aggregate.weight.view(heads, head_dim, kk).to(dtype)
                record('paper', mode, kk, r, lambda: paper_convnn_attention(q, k, v, weight, kk, cand))
    _add_ratios(rows)
    return rows


def _add_ratios(rows: List[Dict[str, Any]]) -> None:
    """time / memory relative to SDPA for the same n and pass."""
    base = {(r['n'], r['pass_']): r for r in rows if r['impl'] == 'sdpa'}
    for r in rows:
        ref = base.get((r['n'], r['pass_']))
        if ref is not None:
            r['time_vs_sdpa'] = r['ms'] / ref['ms']
            if ref.get('peak_bytes'):
                r['memory_vs_sdpa'] = r['peak_bytes'] / ref['peak_bytes']


# -- model level -----------------------------------------------------------------------------------------------------

DEFAULT_PAIRS = (('vit_tiny_convnn_all_k16', 'vit_tiny_patch16_224'),
                 ('vit_tiny_convnn_random', 'vit_tiny_patch16_224'),
                 ('vit_base_convnn_all_k16', 'vit_base_patch16_224'),
                 ('resnet50_convnn_branch', 'resnet50'))


def _bench_model(name: str, device: torch.device, batch_size: int, img_size: Optional[int], amp: bool,
                 compile: bool, channels_last: bool, warmup: int, iters: int,
                 model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    import timm
    model = timm.create_model(name, num_classes=1000, **model_kwargs).to(device)
    size = _input_size(model, img_size)
    x = torch.randn(batch_size, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    run_model = torch.compile(model) if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def infer():
        with torch.no_grad(), _autocast(device, amp):
            run_model(x)

    def train():
        with _autocast(device, amp):
            loss = F.cross_entropy(run_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.eval()
    inf = measure(infer, device, warmup, iters)
    model.train()
    tr = measure(train, device, warmup, iters)
    return dict(model=name, batch=batch_size, img_size=size, amp=amp, compile=compile,
                infer_ms=inf['ms'], infer_img_s=batch_size * 1000 / inf['ms'], infer_peak_bytes=inf['peak_bytes'],
                infer_faults=inf['faults'], train_faults=tr['faults'],
                train_ms=tr['ms'], train_img_s=batch_size * 1000 / tr['ms'], train_peak_bytes=tr['peak_bytes'])


def model_benchmark(
        device: torch.device,
        pairs: Sequence[Sequence[str]] = DEFAULT_PAIRS,
        batch_size: int = 8,
        img_size: Optional[int] = None,
        amp: bool = False,
        compile: bool = False,
        channels_last: bool = False,
        warmup: int = 1,
        iters: int = 3,
        model_kwargs: Optional[Dict[str, Any]] = None,
        backends: Sequence[str] = ('auto',),
        log: Callable[[str], None] = print,
        rows: Optional[List[Dict[str, Any]]] = None,
) -> List[Dict[str, Any]]:
    """Inference and train-step throughput / peak memory of each (convnn, timm) pair, in the same run; each ConvNN
    model once per backend in ``backends`` (rows name it; a model no layer of which runs fused is timed once)."""
    from . import models  # noqa: F401  (registers the models)
    rows = [] if rows is None else rows
    done: Dict[str, Dict[str, Any]] = {}
    convnn_names = {p[0] for p in pairs}
    for pair in pairs:
        for name in pair:
            if name in done:
                continue
            for backend in (backends if name in convnn_names else ('auto',)):
                with _backend(backend):
                    fused = _fused_layers(name, dict(model_kwargs or {}), device, img_size)
                    ran = ('triton' if fused else 'torch') if name in convnn_names else None
                    if any(r['model'] == name and r['backend'] == ran for r in rows):
                        continue  # this backend runs the same code as one already timed
                    row = _bench_model(name, device, batch_size, img_size, amp, compile, channels_last, warmup,
                                       iters, dict(model_kwargs or {}))
                row.update(backend=ran, fused_layers=fused)
                done.setdefault(name, row)
                rows.append(row)
                _pair_ratios(pairs, done, rows)  # (before the log line, which writes the results of a run so far)
                label = name + (f' [{row["backend"]}]' if row['backend'] else '')
                faults = '' if row['infer_faults'] is None else (
                    f'  page faults / call {row["infer_faults"]:.0f} infer, {row["train_faults"]:.0f} train')
                log(f'  {label:36s} infer {row["infer_img_s"]:9.1f} img/s  train {row["train_img_s"]:9.1f} img/s  '
                    f'train peak {row["train_peak_bytes"] / 2 ** 20:8.1f} MiB' + faults)
    return rows


def _pair_ratios(pairs: Sequence[Tuple[str, str]], done: Dict[str, Dict[str, Any]], rows: List[Dict[str, Any]]) -> None:
    """Each timed ConvNN row of a pair whose timm model is timed too: its ratios to that baseline (set as soon as both
    exist, so that a run cut short keeps the pairs it completed)."""
    for convnn, base in pairs:
        t = done.get(base)
        if t is None:
            continue
        for c in rows:
            if c['model'] == convnn:
                c['baseline'] = base
                c['infer_vs_baseline'] = c['infer_img_s'] / t['infer_img_s']
                c['train_vs_baseline'] = c['train_img_s'] / t['train_img_s']
                c['train_memory_vs_baseline'] = c['train_peak_bytes'] / max(1, t['train_peak_bytes'])


# -- reports ---------------------------------------------------------------------------------------------------------

def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _git_commit() -> Optional[str]:
    """The checkout's commit when run from a git working tree (benchmarks belong to a commit), else None."""
    import subprocess
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> Dict[str, Any]:
    import timm
    from .version import __version__
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
               torch=torch.__version__, timm=timm.__version__, timm_convnn=__version__,
               python=platform.python_version(), device=device.type, threads=torch.get_num_threads(),
               triton=_version('triton'), commit=_git_commit())
    if device.type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(device)
    else:
        env['cpu'] = platform.processor() or platform.machine()
    return env


def markdown(result: Dict[str, Any]) -> str:
    env = result['environment']
    lines = [f'Run {env["date"]}, {env.get("gpu") or env.get("cpu")} ({env["device"]}, {env["threads"]} threads), '
             f'torch {env["torch"]}, timm {env["timm"]}, timm-convnn {env["timm_convnn"]}'
             + (f', triton {env["triton"]}' if env.get('triton') else '')
             + (f', commit {env["commit"]}' if env.get('commit') else '')
             + (', bf16 autocast' if result.get('amp') else ', fp32')
             + ''.join(f', {k}={v}' for k, v in (result.get('kernel_config') or {}).items()) + '.', '']
    ops = result.get('ops') or []
    if ops:
        lines += ['| impl | n | batch | K | candidates | pass | ms | x SDPA time | peak MiB | x SDPA memory |',
                  '|---|---|---|---|---|---|---|---|---|---|']
        for r in ops:
            mode = r['mode'] + (f' (r {r["num_samples"]})' if r.get('num_samples') else '')
            impl = r['impl'] + (f' ({r["backend"]})' if r.get('backend') else '')
            lines.append(f'| {impl} | {r["n"]} | {r["batch"]} | {r["K"] or "-"} | {mode} | {r["pass_"]} | '
                         f'{r["ms"]:.2f} | {r.get("time_vs_sdpa", float("nan")):.2f} | '
                         f'{r["peak_bytes"] / 2 ** 20:.1f} | {r.get("memory_vs_sdpa", float("nan")):.2f} |')
        lines.append('')
    mods = result.get('models') or []
    if mods:
        lines += ['| model | batch | px | infer img/s | train img/s | train peak MiB | infer x timm | train x timm | '
                  'memory x timm |', '|---|---|---|---|---|---|---|---|---|']
        for r in mods:
            rel = (f'{r["infer_vs_baseline"]:.2f} | {r["train_vs_baseline"]:.2f} | {r["train_memory_vs_baseline"]:.2f}'
                   if 'baseline' in r else '- | - | -')
            model = r['model'] + (f' ({r["backend"]})' if r.get('backend') else '')
            lines.append(f'| {model} | {r["batch"]} | {r["img_size"]} | {r["infer_img_s"]:.1f} | '
                         f'{r["train_img_s"]:.1f} | {r["train_peak_bytes"] / 2 ** 20:.0f} | {rel} |')
    return '\n'.join(lines).rstrip() + '\n'


def plot(result: Dict[str, Any], path: Path) -> Optional[Path]:
    """Forward + backward time vs n (left) and the same as a ratio to SDPA (right); colour = candidate mode and K,
    line style = implementation. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ops = [r for r in result.get('ops') or [] if r['pass_'] == 'fwd+bwd']
    if not ops:
        return None
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4.5))
    series: Dict[tuple, List] = {}
    for r in ops:
        impl = r['impl'] + (f' ({r["backend"]})' if r.get('backend') == 'triton' else '')
        series.setdefault((impl, r['mode'], r['K']), []).append((r['n'], r['ms'], r.get('time_vs_sdpa')))
    variants = sorted({(m, k) for i, m, k in series if i != 'sdpa'}, key=str)
    colours = {v: plt.get_cmap('tab10')(i % 10) for i, v in enumerate(variants)}
    for (impl, mode, kk), pts in sorted(series.items(), key=str):
        pts.sort()
        if impl == 'sdpa':
            style, label = dict(color='black', linewidth=2.5), 'SDPA'
        else:
            style = dict(color=colours[(mode, kk)], marker='o', markersize=3,
                         linestyle='--' if impl == 'paper' else ':' if 'triton' in impl else '-')
            label = f'{impl} {mode} K={kk}'
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        ax_r.plot([p[0] for p in pts], [p[2] for p in pts], label=label, **style)
    env = result['environment']
    batches = ', '.join(f'n {n}: B {b}' for n, b in sorted({(r['n'], r['batch']) for r in ops}))
    ax_t.set(xscale='log', yscale='log', xlabel='tokens n', ylabel='fwd+bwd ms per call (median)',
             title=f'time ({batches})')
    ax_r.set(xscale='log', yscale='log', xlabel='tokens n', ylabel='time / SDPA time (same run)',
             title='ratio to SDPA (dotted: fused, dashed: paper-style)')
    for ax in (ax_t, ax_r):
        ax.grid(True, which='both', alpha=0.3)
    ax_r.legend(fontsize=7, ncol=2)
    fig.suptitle(f'ConvNN attention core vs SDPA, {env.get("gpu") or env.get("cpu") or env["device"]} '
                 f'({env["device"]}, {env["threads"]} threads), torch {env["torch"]}, {env["date"]}', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- command line ----------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--ops', action='store_true', help='operator level (default when neither is given: both)')
    p.add_argument('--models', action='store_true', help='model level')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', action='store_true', help='bf16 autocast (CUDA; CPU autocast otherwise)')
    p.add_argument('--compile', action='store_true', help='torch.compile the models (model level)')
    p.add_argument('--channels-last', action='store_true', help='channels_last models and input (model level)')
    p.add_argument('--tokens', type=int, nargs='+', default=list(DEFAULT_TOKENS), help='operator token counts n')
    p.add_argument('--op-batches', nargs='+', default=[], metavar='N:B',
                   help='operator batch per token count (default: ' + ' '.join(
                       f'{n}:{b}' for n, b in DEFAULT_BATCH.items()) + '; other n: about 1576 tokens per call)')
    p.add_argument('--neighbors', type=int, nargs='+', default=[9, 16], help='operator K values')
    p.add_argument('--modes', nargs='+', default=['all', 'random', 'spatial'], help='candidate modes')
    p.add_argument('--heads', type=int, default=6)
    p.add_argument('--head-dim', type=int, default=64)
    p.add_argument('--num-samples', type=int, default=128, help='r for random / spatial candidates')
    p.add_argument('--pairs', nargs='+', metavar='CONVNN:TIMM',
                   help='model pairs (default: ' + ' '.join(f'{a}:{b}' for a, b in DEFAULT_PAIRS) + ')')
    p.add_argument('--batch-size', type=int, default=None, help='model batch (default: 256 CUDA, 4 CPU)')
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='create_model kwargs for every model (e.g. img_size=32 patch_size=4 for small ViTs)')
    p.add_argument('--warmup', type=int, default=None)
    p.add_argument('--iters', type=int, default=None)
    p.add_argument('--memory-cap-mib', type=int, default=4096, help='skip paper-style cases estimated above this')
    p.add_argument('--backends', nargs='+', default=['auto'], choices=('auto', 'torch', 'triton'),
                   help='ConvNN backends to time, e.g. "torch triton" for the PyTorch path and the fused kernels '
                        'side by side (default: auto)')
    p.add_argument('--kernel-config', nargs='*', default=[], metavar='KEY=VALUE',
                   help='launch settings of the fused kernels for this run (timm_convnn.layers.triton_attention'
                        '.CONFIG, e.g. fwd_block_m=32 bwd_row_copies=4), recorded with the results')
    p.add_argument('--out', default='bench-out', help='folder for results.json, results.md, ops.png')


def _check_args(args: argparse.Namespace) -> None:
    """Bad options fail before anything is timed, with the value and the valid range."""
    import timm
    from .catalog import check_model_name
    from .layers.common import CANDIDATE_MODES
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f'--device {args.device!r} is not a torch device: {e}') from e
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {args.device}: torch sees no CUDA device here; use --device cpu')
    if 'triton' in args.backends:
        from .layers.triton_attention import triton_unavailable_reason
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f'--backends triton: {reason} (--device {args.device}); time --backends torch or auto')
    positive = dict(tokens=(args.tokens, 2), neighbors=(args.neighbors, 1), heads=([args.heads], 1),
                    head_dim=([args.head_dim], 1), num_samples=([args.num_samples], 1), iters=([args.iters], 1),
                    warmup=([args.warmup], 0), batch_size=([args.batch_size], 1), img_size=([args.img_size], 1))
    for name, (values, low) in positive.items():
        bad = [v for v in values if v is not None and v < low]
        if bad:
            what = ' (a class token and at least one patch)' if name == 'tokens' else ''
            raise ValueError(f'--{name.replace("_", "-")} must be >= {low}{what}; got {bad[0]}')
    bad_modes = [m for m in args.modes if m not in CANDIDATE_MODES]
    if bad_modes:
        raise ValueError(f'--modes takes {", ".join(CANDIDATE_MODES)}; got {bad_modes[0]!r}')
    sampled = [m for m in args.modes if m != 'all']
    if (args.ops or not args.models) and sampled and args.num_samples < max(args.neighbors):
        raise ValueError(f'--num-samples r must be >= every K of --neighbors for --modes {" ".join(sampled)}; got '
                         f'r={args.num_samples}, K={max(args.neighbors)}')
    _op_batches(args.op_batches)
    for pair in args.pairs or []:
        names = pair.split(':')
        if len(names) != 2:
            raise ValueError(f'--pairs takes CONVNN:TIMM; got {pair!r}')
        for name in names:
            check_model_name(name)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f'--out {args.out} is a file, not a folder')
    if args.models or not args.ops:  # (the models are timed): every one takes --model-kwargs
        kwargs = _model_kwargs(args.model_kwargs)
        pairs = [p.split(':') for p in args.pairs] if args.pairs else DEFAULT_PAIRS
        for name in sorted({n for pair in pairs for n in pair}):
            try:
                timm.create_model(name, num_classes=1000, device='meta', **kwargs)
            except TypeError as e:
                raise ValueError(f'--model-kwargs: {name} does not take {kwargs}: {e}') from e


def _op_batches(items: Sequence[str]) -> Dict[int, int]:
    """``--op-batches N:B`` items -> {tokens: batch}."""
    batches = {}
    for item in items:
        n, _, b = item.partition(':')
        if not (n.isdigit() and b.isdigit() and int(b) > 0):
            raise ValueError(f'--op-batches takes N:B with positive integers; got {item!r}')
        batches[int(n)] = int(b)
    return batches


def _model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """``--model-kwargs KEY=VALUE`` items -> create_model kwargs (values as Python literals, else strings)."""
    return _key_values(items, '--model-kwargs')


def _kernel_config(items: Sequence[str]) -> Dict[str, Any]:
    """``--kernel-config KEY=VALUE`` items -> CONFIG updates; unknown keys fail with the valid ones."""
    from .layers.triton_attention import CONFIG
    return _key_values(items, '--kernel-config', CONFIG)


def _key_values(items: Sequence[str], option: str, keys: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``KEY=VALUE`` items -> {KEY: VALUE as a Python literal, else the string}; a KEY outside ``keys`` (when given),
    an empty one or a missing ``=`` fails, naming ``option`` (and the valid keys)."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key or (keys is not None and key not in keys):
            valid = f' with KEY one of {", ".join(keys)}' if keys is not None else ''
            raise ValueError(f'{option} takes KEY=VALUE items{valid}; got {item!r}')
        parsed[key] = _literal(value)
    return parsed


def _literal(value: str) -> Any:
    import ast
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> Dict[str, Any]:
    from .layers.triton_attention import CONFIG
    _check_args(args)
    config = _kernel_config(args.kernel_config)
    saved = dict(CONFIG)
    CONFIG.update(config)
    try:
        return _run(args, config, log)
    finally:
        CONFIG.clear()
        CONFIG.update(saved)


def _run(args: argparse.Namespace, kernel_config: Dict[str, Any], log: Callable[[str], None]) -> Dict[str, Any]:
    device = torch.device(args.device)
    both = not args.ops and not args.models
    cuda = device.type == 'cuda'
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    iters = args.iters if args.iters is not None else (20 if cuda else 3)
    result: Dict[str, Any] = dict(environment=environment(device), amp=args.amp, compile=args.compile)
    if kernel_config:
        result['kernel_config'] = kernel_config
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(final: bool = False) -> Optional[Path]:
        _add_ratios(result.get('ops') or [])
        (out / 'results.json').write_text(json.dumps(result, indent=2))
        (out / 'results.md').write_text(markdown(result))
        return plot(result, out / 'ops.png') if final else None

    def progress(line: str) -> None:  # every measured row is on disk at once: a run cut short keeps its results
        log(line)
        write()

    if args.ops or both:
        log('operator level (ConvNN core vs SDPA vs paper-style):')
        result['ops'] = []
        batches = {**DEFAULT_BATCH, **_op_batches(args.op_batches)}
        op_benchmark(device, args.tokens, args.neighbors, args.modes, args.heads, args.head_dim, args.num_samples,
                     batch=batches, amp=args.amp, memory_cap_bytes=args.memory_cap_mib << 20, warmup=warmup,
                     iters=iters, backends=args.backends, log=progress, rows=result['ops'])
    if args.models or both:
        pairs = [tuple(p.split(':')) for p in args.pairs] if args.pairs else DEFAULT_PAIRS
        kwargs = _model_kwargs(args.model_kwargs)
        log('model level (inference, train step):')
        result['models'] = []
        model_benchmark(device, pairs, args.batch_size or (256 if cuda else 4), args.img_size, args.amp,
                        args.compile, args.channels_last, warmup, iters, kwargs, args.backends, progress,
                        rows=result['models'])
    png = write(final=True)
    note = f', {png}' if png else (' (no plot: pip install matplotlib)' if result.get('ops') else '')
    log(f'wrote {out / "results.json"}, {out / "results.md"}{note}')
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == '__main__':
    main()
