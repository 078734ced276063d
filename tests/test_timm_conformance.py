"""Conformance: timm's own model tests (from timm's sdist) pass for every ConvNN model.

1. timm's ``tests/test_models.py`` runs unmodified with the plugin loaded (``pytest -p timm_convnn``), selecting our
   models by name; every test kind timm selects for a model must have run and passed.
2. timm selects ``forward_intermediates`` / features-getter / pruning-contract tests by *module* name, so they are
   never collected for a plugin's models: those timm test functions are called directly here.
"""
import os

import pytest

import timm
import timm_convnn  # noqa: F401

from .timm_sdist import import_timm_test_models, run_timm_model_suite, summary_line

# test kinds timm's test_models.py selects for ``vit_*`` models (non-standard: no forward_features / pool tests)
VIT_KINDS = (
    'test_model_forward', 'test_model_backward', 'test_model_default_cfgs_non_std', 'test_model_forward_torchscript',
    'test_model_forward_fx', 'test_model_backward_fx', 'test_model_forward_fx_torchscript',
)


def test_timm_model_suite_vit():
    names = timm.list_models('vit_*_convnn*')
    assert len(names) == 21
    results, text = run_timm_model_suite('vit_ and convnn')
    bad = {k: v for k, v in results.items() if v != 'PASSED'}
    assert not bad, f'{bad}\n{text[-6000:]}'
    missing = [(kind, n) for kind in VIT_KINDS for n in names if (kind, n) not in results]
    assert not missing, f'timm tests that did not run: {missing}\n{summary_line(text)}'
    assert set(n for _, n in results) == set(names)


# forward_intermediates & co. for every tiny model and the headline small/base ones; all 21 with
# TIMM_CONVNN_FULL_SUITE=1 (about 14 min on 2 CPU cores: the base models dominate)
_SELECTED = timm.list_models('vit_tiny_convnn_*') + ['vit_small_convnn_random', 'vit_base_convnn_all_k16']
INTERMEDIATE_NAMES = timm.list_models('vit_*_convnn_*') if os.environ.get('TIMM_CONVNN_FULL_SUITE') else _SELECTED


@pytest.fixture(scope='module')
def timm_tests():
    return import_timm_test_models()


@pytest.mark.parametrize('name', INTERMEDIATE_NAMES)
def test_timm_forward_intermediates(timm_tests, name):
    timm_tests.test_model_forward_intermediates(name, 1)
    timm_tests.test_model_forward_intermediates_features(name, 1)


@pytest.mark.parametrize('name', INTERMEDIATE_NAMES)
def test_timm_prune_intermediate_layers_contract(timm_tests, name):
    timm_tests.test_prune_intermediate_layers_contract(name)
