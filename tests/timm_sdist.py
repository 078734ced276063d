"""timm's own test suite, fetched from timm's sdist at test time (cached, never committed).

The sdist of the installed timm version is downloaded once with pip (``pip download timm==<ver> --no-binary``) into
``$TIMM_CONVNN_CACHE`` (default ``~/.cache/timm-convnn``) and unpacked; ``TIMM_TESTS_DIR`` points at an existing
``tests/`` directory instead.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import timm
from filelock import FileLock


def timm_tests_dir() -> Path:
    if os.environ.get('TIMM_TESTS_DIR'):
        return Path(os.environ['TIMM_TESTS_DIR'])
    version = timm.__version__
    cache = Path(os.environ.get('TIMM_CONVNN_CACHE', Path.home() / '.cache' / 'timm-convnn'))
    tests = cache / f'timm-{version}' / 'tests'
    if (tests / 'test_models.py').exists():
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    # pytest-xdist workers (the README's test command) may both get here on a fresh machine: one fetches, the other
    # waits for it
    with FileLock(str(cache / f'timm-{version}.lock')):
        if not (tests / 'test_models.py').exists():
            _fetch(version, cache, tests)
    return tests


def _fetch(version: str, cache: Path, tests: Path):
    """timm's sdist of ``version`` downloaded into ``cache`` and its tests/ unpacked as ``tests``."""
    out = subprocess.run(
        [sys.executable, '-m', 'pip', 'download', '--quiet', f'timm=={version}', '--no-deps', '--no-binary', ':all:',
         '-d', str(cache)], capture_output=True, text=True)
    archive = cache / f'timm-{version}.tar.gz'
    if out.returncode != 0 or not archive.exists():
        raise RuntimeError(f'could not fetch timm {version} sdist with pip (needed for timm\'s own model tests):\n'
                           f'{out.stderr[-2000:]}\nSet TIMM_TESTS_DIR to an unpacked timm tests/ directory instead.')
    # unpacked beside and moved into place in one rename: a process that finds test_models.py finds all of tests/
    with tempfile.TemporaryDirectory(dir=cache) as scratch, tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f'timm-{version}/tests/')]
        tar.extractall(scratch, members=members, filter='data')
        tests.parent.mkdir(exist_ok=True)
        shutil.rmtree(tests, ignore_errors=True)  # an unpacking cut short before
        os.replace(Path(scratch) / f'timm-{version}' / 'tests', tests)


def import_timm_test_models():
    """timm's tests/test_models.py as a module object (so pytest does not collect its 18k tests here)."""
    path = timm_tests_dir() / 'test_models.py'
    spec = importlib.util.spec_from_file_location('timm_sdist_test_models', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_RESULT = re.compile(r'^(PASSED|FAILED|ERROR|SKIPPED)\S* \S*::(test_\w+)\[(?:\d+-)?([\w.]+)\]', re.M)
_NODE = re.compile(r'^(\S*test_models\.py::test_\w+\[(?:\d+-)?([\w.]+)\])$', re.M)


def _pytest(args: List[str], timeout: int) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    env.pop('GITHUB_ACTIONS', None)
    cmd = [sys.executable, '-m', 'pytest', '-p', 'timm_convnn', '-p', 'no:cacheprovider'] + args
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=timm_tests_dir().parent)
    return out.stdout + out.stderr


def run_timm_model_suite(names: List[str], timeout: int = 3600) -> Tuple[Dict[Tuple[str, str], str], str]:
    """Run timm's test_models.py, unmodified, with the plugin loaded, on exactly the models ``names``.

    Collects timm's tests for ConvNN models (minus the ones needing real Hub weights), keeps those whose model
    parameter is one of ``names`` and runs them as timm's CI would locally (no GITHUB_ACTIONS), offline.
    Returns ({(test function, model name): outcome}, output).
    """
    listing = _pytest(['--collect-only', '-q', 'tests/test_models.py', '-k', 'convnn and not pretrained'], timeout)
    # cfg tests are parametrized by ``arch.tag``: keep a test when its architecture is selected
    nodes = [m.group(1) for m in _NODE.finditer(listing) if m.group(2).split('.')[0] in set(names)]
    if not nodes:
        return {}, listing
    text = _pytest(['-q', '-rA'] + nodes, timeout)
    results: Dict[Tuple[str, str], str] = {}
    for m in _RESULT.finditer(text):
        key = (m.group(2), m.group(3).split('.')[0])
        if results.get(key, 'PASSED') == 'PASSED':  # any failing tag of an architecture marks it failed
            results[key] = m.group(1)
    return results, text


def summary_line(text: str) -> List[str]:
    return [line for line in text.splitlines() if re.search(r'\d+ (passed|failed|error)', line)][-1:]
