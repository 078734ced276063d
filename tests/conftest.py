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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
