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


# ... and for the CNNs (standard models: also forward_features / pool-size checks)
CNN_KINDS = (
    'test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_torchscript',
    'test_model_forward_features', 'test_model_forward_fx', 'test_model_backward_fx',
    'test_model_forward_fx_torchscript',
)
# timm's test_model_load_pretrained / test_model_features_pretrained need the real Hub weights (offline here);
# test_hub.py runs timm's test_model_load_pretrained against stand-in weights in a local Hub cache instead
FAMILIES = {
    'vit': ('vit_*_convnn*', 'vit_ and convnn and not pretrained', VIT_KINDS, 21),
    'cnn': (['resnet*_convnn*', 'vgg*_convnn*'], 'convnn and (resnet or vgg) and not pretrained', CNN_KINDS, 9),
}


@pytest.mark.parametrize('family', list(FAMILIES))
def test_timm_model_suite(family):
    pattern, keyword, kinds, count = FAMILIES[family]
    names = timm.list_models(pattern)
    assert len(names) == count
    results, text = run_timm_model_suite(keyword)
    bad = {k: v for k, v in results.items() if v != 'PASSED'}
    assert not bad, f'{bad}\n{text[-6000:]}'
    missing = [(kind, n) for kind in kinds for n in names if (kind, n) not in results]
    assert not missing, f'timm tests that did not run: {missing}\n{summary_line(text)}'
    assert set(n for _, n in results) == set(names)


# forward_intermediates & co. for every tiny ViT, one small ViT and the main CNNs in CI; every model with
# TIMM_CONVNN_FULL_SUITE=1 (about 20 min on 2 CPU cores: the base ViTs and VGGs dominate)
_SELECTED = timm.list_models('vit_tiny_convnn_*') + [
    'vit_small_convnn_random', 'resnet18_convnn', 'resnet18_convnn_branch', 'resnet50_convnn_branch',
    'vgg11_convnn_branch']
_ALL = timm.list_models(['vit_*_convnn*', 'resnet*_convnn*', 'vgg*_convnn*'])
INTERMEDIATE_NAMES = _ALL if os.environ.get('TIMM_CONVNN_FULL_SUITE') else _SELECTED


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
