import os

import pytest
import torch

# the markers of timm's own tests/test_models.py, which conformance and Hub tests import (timm registers them in its
# own pytest config; 'timeout' belongs to pytest-timeout, which is not installed: timm's time limits are not enforced)
_TIMM_TEST_MARKERS = ('base', 'cfg', 'cfg_nonstd', 'features', 'forward', 'backward', 'torchscript', 'fxforward',
                      'fxbackward', 'timeout(seconds): pytest-timeout time limit (not enforced here)')


def pytest_configure(config):
    for marker in _TIMM_TEST_MARKERS:
        config.addinivalue_line('markers', marker)
    # pytest-xdist workers (the README's test command runs two) share the machine's cores: torch's thread pool in
    # each takes its share of them instead of all of them
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# The slowest test files, handed out first: `pytest -n 2 --dist loadfile` (the README's test command) gives each
# worker whole files in collection order, two to start with and one more whenever it is down to one, so a slow file
# collected last would run alone at the end while the other worker waits. Clean-clone CI on 2026-12-01 with a cold
# Triton cache: timm's model suites 273 + 251 s, the sm_90 compile test 305 s, the interpreter test 264 s, the demo
# 123 s; the suite 1,269 s (the run before this order, the compile and interpreter tests in one file: 1,430 s).
_SLOW_FILES_FIRST = ('test_timm_conformance.py', 'test_triton_compile.py', 'test_triton.py', 'test_demo.py')


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(_SLOW_FILES_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
