"""What zero-touch registration costs: interpreter start-up, and the first ``import timm``.

    python benchmarks/startup.py             # 30 fresh interpreters for start-up, 3 for import timm
    python benchmarks/startup.py --json

Start-up: each run is a fresh ``python -S`` that processes the site-packages ``.pth`` files in site.py's order and
times only ``timm_convnn-autoload.pth`` (reading it, importing the hook module from its bytecode cache, putting the
finder on ``sys.meta_path``). ``import timm``: wall time of a fresh ``import timm`` with autoload on (timm, then
timm_convnn registering its models) and with ``TIMM_CONVNN_AUTOLOAD=0`` (timm alone).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

PTH = 'timm_convnn-autoload.pth'

_SITE_RUN = r'''
import os, site, sys, time
sp, pth = sys.argv[1], sys.argv[2]
if sp not in sys.path:
    sys.path.append(sp)
known = set()
took = None
for name in sorted(os.listdir(sp)):  # site.py's order: earlier .pth files (editable finders) run first
    if name.endswith('.pth'):
        t = time.perf_counter()
        site.addpackage(sp, name, known)
        if name == pth:
            took = time.perf_counter() - t
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'timm_convnn', 'numpy'))
print(took, '_timm_convnn_autoload' in sys.modules, ','.join(heavy))
'''

_IMPORT_RUN = r'''
import sys, time
t = time.perf_counter()
import timm
print(time.perf_counter() - t, len(timm.list_models('*convnn*')))
'''


def site_dir_with_hook() -> str:
    import site
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    for d in dirs:
        if os.path.isfile(os.path.join(d, PTH)):
            return d
    raise SystemExit(f'{PTH} is not in any site-packages of {sys.executable} ({dirs}): install timm-convnn with pip '
                     f'(pip install . or pip install -e .)')


def measure(runs: int = 30, import_runs: int = 3) -> dict:
    sp = site_dir_with_hook()
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONDONTWRITEBYTECODE'}  # as a user's machine: .pyc cached
    subprocess.run([sys.executable, '-c', 'pass'], env=env, check=True)  # writes the hook's .pyc if missing
    start = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, '-S', '-c', _SITE_RUN, sp, PTH], env=env, capture_output=True,
                             text=True, check=True)
        took, hooked, heavy = out.stdout.split(' ')
        if hooked != 'True' or heavy.strip():
            raise SystemExit(f'unexpected start-up state: hook loaded {hooked}, heavy modules {heavy.strip()!r}')
        start.append(float(took) * 1e3)
    imports = {}
    for label, extra in (('autoload', {}), ('off', {'TIMM_CONVNN_AUTOLOAD': '0'})):
        times, counts = [], set()
        for _ in range(import_runs):
            out = subprocess.run([sys.executable, '-c', _IMPORT_RUN], env=dict(env, **extra), capture_output=True,
                                 text=True, check=True)
            took, count = out.stdout.split()
            times.append(float(took))
            counts.add(int(count))
        imports[label] = dict(median_s=statistics.median(times), convnn_models=sorted(counts))
    return dict(python=sys.version.split()[0], site_packages=sp, startup_runs=runs,
                startup_ms_median=statistics.median(start), startup_ms_max=max(start), import_timm=imports)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', type=int, default=30)
    p.add_argument('--import-runs', type=int, default=3)
    p.add_argument('--json', action='store_true')
    args = p.parse_args(argv)
    r = measure(args.runs, args.import_runs)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    on, off = r['import_timm']['autoload'], r['import_timm']['off']
    print(f'| measurement | value |\n|---|---|\n'
          f'| start-up cost of the hook (median of {r["startup_runs"]} fresh interpreters) | '
          f'{r["startup_ms_median"]:.2f} ms (max {r["startup_ms_max"]:.2f}) |\n'
          f'| first `import timm`, autoload on ({on["convnn_models"][0]} convnn models registered) | '
          f'{on["median_s"]:.2f} s |\n'
          f'| first `import timm`, `TIMM_CONVNN_AUTOLOAD=0` ({off["convnn_models"][0]} convnn models) | '
          f'{off["median_s"]:.2f} s |')


if __name__ == '__main__':
    main()
