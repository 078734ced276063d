"""timm's own test suite, fetched from timm's sdist at test time (cached, never committed).

The sdist of the installed timm version is downloaded once with pip (``pip download timm==<ver> --no-binary``) into
``$TIMM_CONVNN_CACHE`` (default ``~/.cache/timm-convnn``) and unpacked; ``TIMM_TESTS_DIR`` points at an existing
``tests/`` directory instead.
"""
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

import timm


def timm_tests_dir() -> Path:
    if os.environ.get('TIMM_TESTS_DIR'):
        return Path(os.environ['TIMM_TESTS_DIR'])
    version = timm.__version__
    cache = Path(os.environ.get('TIMM_CONVNN_CACHE', Path.home() / '.cache' / 'timm-convnn'))
    tests = cache / f'timm-{version}' / 'tests'
    if (tests / 'test_models.py').exists():
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        [sys.executable, '-m', 'pip', 'download', '--quiet', f'timm=={version}', '--no-deps', '--no-binary', ':all:',
         '-d', str(cache)], capture_output=True, text=True)
    archive = cache / f'timm-{version}.tar.gz'
    if out.returncode != 0 or not archive.exists():
        raise RuntimeError(f'could not fetch timm {version} sdist with pip (needed for timm\'s own model tests):\n'
                           f'{out.stderr[-2000:]}\nSet TIMM_TESTS_DIR to an unpacked timm tests/ directory instead.')
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f'timm-{version}/tests/')]
        tar.extractall(cache, members=members, filter='data')
    return tests


def import_timm_test_models():
    """timm's tests/test_models.py as a module object (so pytest does not collect its 18k tests here)."""
    path = timm_tests_dir() / 'test_models.py'
    spec = importlib.util.spec_from_file_location('timm_sdist_test_models', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_RESULT = re.compile(r'^(PASSED|FAILED|ERROR|SKIPPED)\S* \S*::(test_\w+)\[(?:\d+-)?([\w.]+)\]', re.M)


def run_timm_model_suite(keyword: str, timeout: int = 1800) -> Tuple[Dict[Tuple[str, str], str], str]:
    """Run timm's test_models.py with the plugin loaded, selecting tests by ``-k keyword``.

    Returns ({(test function, model name): outcome}, output). Runs as timm's CI would locally (no GITHUB_ACTIONS),
    offline from the Hub.
    """
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    env.pop('GITHUB_ACTIONS', None)
    cmd = [sys.executable, '-m', 'pytest', '-p', 'timm_convnn', '-p', 'no:cacheprovider', '-q', '-rA',
           str(timm_tests_dir() / 'test_models.py'), '-k', keyword]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    text = out.stdout + out.stderr
    results = {(m.group(2), m.group(3)): m.group(1) for m in _RESULT.finditer(text)}
    return results, text


def summary_line(text: str) -> List[str]:
    return [line for line in text.splitlines() if re.search(r'\d+ (passed|failed|error)', line)][-1:]
