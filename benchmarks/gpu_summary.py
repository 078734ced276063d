"""What a ``gpu_check.sh`` run says about the performance issue's targets, read from its output folder.

    python benchmarks/gpu_summary.py DIR        # gpu-check.tgz unpacked, or ./gpu-out

For whatever stages ran (a missing file is a stage that was skipped or cut short; ``skipped.txt`` names those):
* the CUDA tests of each log (``test.log``: the built-in launches, ``test-optin.log``: the opt-in ones,
  ``test-scripts.log``: timm's scripts on the GPU, ``test-compile.log``: torch.compile): passed / failed / errors, and
  the failing test ids;
* model level: each ConvNN model's inference and train-step throughput and train peak memory as ratios to its timm
  counterpart, built in (``models/``) and per ``--kernel-config`` variant (``variant-*/``), against the targets for
  ``vit_base_convnn_all_k16``;
* operator level: the fused attention core's forward + backward time over SDPA's from 4,096 tokens up, every token
  a candidate (target: at most SDPA's time) and sampled candidates (target: at least 4x faster), built in (``ops/``)
  and per variant;
* the launch sweeps (``sweep*.json``, ``contention.json``, ``select*.json``): the fastest launch of each case, next
  to the first one timed (the built-in launch, or the PyTorch selection).
It reads the files the harness writes and prints; it decides nothing. Tested on CPU against the stored H200 run of
2026-11-30 (``benchmarks/results/h200-*``).
"""
import argparse
import json
import pathlib
import re
from typing import Any, Dict, List, Optional, Tuple

# (model, metric, bound, at least?) for the model level; ratios are ConvNN / timm in the same run
MODEL_TARGETS = (('vit_base_convnn_all_k16', 'infer_vs_baseline', 0.8, True),
                 ('vit_base_convnn_all_k16', 'train_vs_baseline', 0.7, True),
                 ('vit_base_convnn_all_k16', 'train_memory_vs_baseline', 1.1, False))
# operator level, from this many tokens up: `all` at most SDPA's forward + backward time, sampled candidates (r up to
# SAMPLED_MOST) at least SAMPLED_SPEEDUP times faster
LARGE_N = 4096
SAMPLED_MOST = 128
SAMPLED_SPEEDUP = 4.0


def _load(path: pathlib.Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _verdict(value: float, bound: float, at_least: bool) -> str:
    """The value to three decimals (1.103 is above a 1.1 bound, which 1.10 would hide) and whether it meets it."""
    met = value >= bound if at_least else value <= bound
    return f'{value:.3f}, {"met" if met else "NOT met"} ({">=" if at_least else "<="} {bound:g})'


def log_counts(log: str) -> Tuple[Dict[str, int], List[str], bool]:
    """(counts by outcome, failing test ids, finished) of a pytest log: the closing summary line when there is one
    (``finished``), else the per-test outcomes that ``-v`` printed before the run was cut short."""
    summary = None
    for line in log.splitlines():
        if re.match(r'^(=+ )?\d+ (passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s', line):
            summary = line
    failing = sorted(set(re.findall(r'^(\S+::\S+) (?:FAILED|ERROR)', log, flags=re.M))
                     | set(re.findall(r'^(?:FAILED|ERROR) (\S+::\S+)', log, flags=re.M)))
    counts: Dict[str, int] = {}
    if summary is not None:
        for n, word in re.findall(r'(\d+) (passed|failed|errors?|skipped|deselected)', summary):
            counts['error' if word == 'errors' else word] = int(n)
    else:
        for outcome in re.findall(r'^\S+::\S+ (PASSED|FAILED|SKIPPED|ERROR)', log, flags=re.M):
            counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    return counts, failing, summary is not None


def harness_runs(root: pathlib.Path) -> List[Tuple[str, Dict[str, Any]]]:
    """(label, results.json) of the built-in model and operator runs (``models/``, ``ops/``), of the model run under
    torch.compile (``compile/``) and of every variant-*/ run (labelled with its kernel config), each read once."""
    runs = []
    for folder in [root / 'models', root / 'ops', root / 'compile'] + sorted(root.glob('variant-*')):
        result = _load(folder / 'results.json')
        if result is not None:
            config = ' '.join(f'{k}={v}' for k, v in (result.get('kernel_config') or {}).items())
            label = {'models': 'built in', 'ops': 'built in', 'compile': 'built in, torch.compile'}.get(
                folder.name, f'{folder.name} ({config})')
            runs.append((label, result))
    return runs


def model_rows(runs: List[Tuple[str, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Every ConvNN model row of the runs, labelled with its run."""
    rows = []
    for label, result in runs:
        for row in result.get('models') or ():
            if 'baseline' in row:
                rows.append(dict(row, run=label))
    return rows


def op_rows(runs: List[Tuple[str, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """The fused core's forward + backward rows from LARGE_N tokens up of the runs, labelled with its run."""
    rows = []
    for label, result in runs:
        for row in result.get('ops') or ():
            if (row.get('impl') == 'convnn' and row.get('backend') == 'triton' and row.get('pass_') == 'fwd+bwd'
                    and row.get('n', 0) >= LARGE_N and row.get('time_vs_sdpa')):
                rows.append(dict(row, run=label))
    return rows


def sweep_best(rows: List[Dict[str, Any]]) -> List[Tuple[Tuple, Dict[str, Any], Optional[Dict[str, Any]]]]:
    """(shape, kernel, K, candidates, selection), the fastest timed row and the first timed row (the built-in launch
    in the forward / backward sweeps; the PyTorch selection in --select) of each case of a kernel_sweep.py JSON."""
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for row in rows:
        if isinstance(row.get('ms'), (int, float)) and row['ms'] == row['ms']:  # not NaN (a launch that failed)
            key = tuple(row.get(k) for k in ('shape', 'kernel', 'K', 'candidates', 'selection'))
            groups.setdefault(key, []).append(row)
    return [(key, min(group, key=lambda r: r['ms']), group[0]) for key, group in groups.items()]


def _launch(row: Dict[str, Any]) -> str:
    """A sweep row's launch settings (none: the built-in launch of a --contention row)."""
    keys = ('impl', 'stream', 'block_m', 'warps', 'select', 'keys', 'dot', 'dw_copies', 'row_copies', 'listed',
            'block_c', 'dtype')
    return ' '.join(f'{k}={row[k]}' for k in keys if row.get(k) is not None) or 'built in'


def summary(root: pathlib.Path) -> str:
    lines = [f'# gpu_check results in {root}']
    runs = harness_runs(root)
    env = next((r['environment'] for _, r in runs if r.get('environment')), None)
    if env:
        lines.append(', '.join(f'{k} {env[k]}' for k in ('date', 'gpu', 'torch', 'triton', 'timm', 'commit')
                               if env.get(k)))
    skipped = root / 'skipped.txt'
    if skipped.exists() and skipped.read_text().strip():
        lines += ['', '## Not run (the time budget)'] + [f'- {line}' for line in skipped.read_text().splitlines()]

    lines += ['', '## CUDA tests']
    for name in ('test.log', 'test-optin.log', 'test-scripts.log', 'test-compile.log'):
        path = root / name
        if not path.exists():
            lines.append(f'- {name}: missing')
            continue
        counts, failing, finished = log_counts(path.read_text(errors='replace'))
        text = ', '.join(f'{n} {k}' for k, n in sorted(counts.items())) or 'nothing ran'
        lines.append(f'- {name}: {text}' + ('' if finished else ' (cut short: no closing summary)'))
        lines += [f'  - failing: {test_id}' for test_id in failing]

    lines += ['', '## Model level (ConvNN / timm, same run)']
    rows = model_rows(runs)
    if not rows:
        lines.append('- no model-level results')
    for row in rows:
        lines.append(f'- {row["model"]} [{row.get("backend")}], {row["run"]}: inference '
                     f'{row["infer_vs_baseline"]:.2f}x, train {row["train_vs_baseline"]:.2f}x, train memory '
                     f'{row["train_memory_vs_baseline"]:.2f}x')
        for model, metric, bound, at_least in MODEL_TARGETS:
            if row['model'] == model and row.get('backend') == 'triton':
                lines.append(f'  - target {metric}: {_verdict(row[metric], bound, at_least)}')

    lines += ['', f'## Attention core, fused, forward + backward, n >= {LARGE_N} (time / SDPA time)']
    rows = op_rows(runs)
    if not rows:
        lines.append('- no operator-level results')
    for row in rows:
        ratio = row['time_vs_sdpa']
        label = f'- n {row["n"]}, {row["mode"]}' + (f' r {row["num_samples"]}' if row.get('num_samples') else '')
        label += f', K {row["K"]}, {row["run"]}: {ratio:.2f}x SDPA\'s time'
        if row['mode'] == 'all':
            label += f'; target time / SDPA\'s: {_verdict(ratio, 1.0, False)}'
        elif (row.get('num_samples') or 0) <= SAMPLED_MOST:
            label += f'; target speed-up: {_verdict(1 / ratio, SAMPLED_SPEEDUP, True)}'
        lines.append(label)

    sweeps = sorted(set(root.glob('sweep*.json')) | set(root.glob('contention*.json')) | set(root.glob('select*.json')))
    if sweeps:
        lines += ['', '## Launch sweeps (the fastest launch per case, and the first timed: the built-in one, or the '
                  'PyTorch selection)']
    for path in sweeps:
        data = _load(path)
        if not isinstance(data, list):
            lines.append(f'- {path.name}: unreadable')
            continue
        for (shape, kernel, K, candidates, selection), best, first in sweep_best(data):
            case = f'{shape} {kernel} K {K}' + (f' over {candidates} candidates' if candidates else '') + (
                f' {selection}' if selection else '')
            lines.append(f'- {path.name} {case}: fastest {best["ms"]:.3f} ms ({_launch(best)})'
                         + ('' if best is first else f'; first {first["ms"]:.3f} ms ({_launch(first)})'))
    return '\n'.join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folder', nargs='?', default='gpu-out')
    args = p.parse_args()
    root = pathlib.Path(args.folder)
    if not root.is_dir():
        raise SystemExit(f'gpu_summary.py: no folder {root} (unpack gpu-check.tgz there, or run gpu_check.sh)')
    print(summary(root))


if __name__ == '__main__':
    main()
