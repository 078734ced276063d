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
# Which models CI runs timm's suite on: every tiny/small ViT, every ResNet and the paper's VGG-11 branch model
# (about 9 min on 2 CPU cores). TIMM_CONVNN_FULL_SUITE=1 runs all 30 models (base ViTs and the other two VGG-11s
# add about 8 min: a 224 px VGG forward scores 2.6 G pixel pairs in its first layer).
# timm's test_model_load_pretrained / test_model_features_pretrained need the real Hub weights (offline here);
# test_hub.py runs timm's test_model_load_pretrained against stand-in weights in a local Hub cache instead.
FULL = bool(os.environ.get('TIMM_CONVNN_FULL_SUITE'))
FAMILIES = {
    'vit': ('vit_*_convnn*' if FULL else ['vit_tiny_convnn*', 'vit_small_convnn*'], VIT_KINDS),
    'cnn': (['resnet*_convnn*', 'vgg*_convnn*'] if FULL else ['resnet*_convnn*', 'vgg11_convnn_branch'], CNN_KINDS),
}


@pytest.mark.parametrize('family', list(FAMILIES))
def test_timm_model_suite(family):
    pattern, kinds = FAMILIES[family]
    names = timm.list_models(pattern)
    assert len(names) == {('vit', False): 14, ('vit', True): 21, ('cnn', False): 7, ('cnn', True): 9}[family, FULL]
    results, text = run_timm_model_suite(names)
    bad = {k: v for k, v in results.items() if v != 'PASSED'}
    assert not bad, f'{bad}\n{text[-6000:]}'
    missing = [(kind, n) for kind in kinds for n in names if (kind, n) not in results]
    assert not missing, f'timm tests that did not run: {missing}\n{summary_line(text)}'
    assert set(n for _, n in results) == set(names)


# forward_intermediates & co. for one model of each kind in CI; every model with TIMM_CONVNN_FULL_SUITE=1
_SELECTED = ['vit_tiny_convnn_all', 'vit_tiny_convnn_random', 'vit_tiny_convnn_spatial', 'vit_tiny_convnn_branch',
             'resnet18_convnn', 'resnet18_convnn_branch', 'vgg11_convnn_branch']
_ALL = timm.list_models(['vit_*_convnn*', 'resnet*_convnn*', 'vgg*_convnn*'])
INTERMEDIATE_NAMES = _ALL if FULL else _SELECTED


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


def _private_timm_names(source: str):
    """Private timm names a module's source reaches: ``from timm.models._builder import ...``, ``import
    timm.models._hub``, ``from timm.models import _hub`` or ``timm.models._hub.x`` (a leading underscore in any
    component after ``timm``; dunders such as ``timm.__version__`` are public)."""
    import ast

    def private(parts):
        return any(p.startswith('_') and not p.endswith('__') for p in parts[1:])

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'timm':
            parts = node.module.split('.')
            if private(parts) or any(private(parts + [a.name]) for a in node.names):
                found.append(f'from {node.module} import {", ".join(a.name for a in node.names)}')
        elif isinstance(node, ast.Import):
            found += [f'import {a.name}' for a in node.names if a.name.split('.')[0] == 'timm'
                      and private(a.name.split('.'))]
        elif isinstance(node, ast.Attribute):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id == 'timm' and private(['timm'] + chain):
                found.append('.'.join(['timm'] + chain))
    return found


def test_private_timm_name_finder():
    assert _private_timm_names('from timm.models._builder import resolve_pretrained_cfg') != []
    assert _private_timm_names('from timm.models import _hub') != []
    assert _private_timm_names('import timm.models._registry') != []
    assert _private_timm_names('import timm\ntimm.models._hub.hf_hub_download') != []
    assert _private_timm_names('import timm\nfrom timm.models import resolve_pretrained_cfg\ntimm.__version__') == []


def test_the_package_uses_timm_public_api_only():
    # timm moves and renames its private modules between releases (its deprecated timm.models.registry path broke
    # plugins in 1.0.10); the plugin reaches timm only through public names, so a timm update within the declared
    # range cannot break an import
    import pathlib
    root = pathlib.Path(timm_convnn.__file__).parent
    files = sorted(root.rglob('*.py')) + [root.parent / '_timm_convnn_autoload.py']
    assert len(files) > 20
    found = {str(f.relative_to(root.parent)): names for f in files
             if (names := _private_timm_names(f.read_text(encoding='utf-8')))}
    assert not found, found
