import pytest
import torch

# the markers of timm's own tests/test_models.py, which conformance and Hub tests import (timm registers them in its
# own pytest config; 'timeout' belongs to pytest-timeout, which is not installed: timm's time limits are not enforced)
_TIMM_TEST_MARKERS = ('base', 'cfg', 'cfg_nonstd', 'features', 'forward', 'backward', 'torchscript', 'fxforward',
                      'fxbackward', 'timeout(seconds): pytest-timeout time limit (not enforced here)')


def pytest_configure(config):
    for marker in _TIMM_TEST_MARKERS:
        config.addinivalue_line('markers', marker)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
