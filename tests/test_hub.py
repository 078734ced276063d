"""Pretrained weights and the Hugging Face Hub, all offline against a local Hub cache built here."""
import argparse
import csv
import json
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import timm
import timm_convnn  # noqa: F401
from timm_convnn import hub
from timm_convnn.cli import main as cli_main

from .hub_cache import HubCache, add_timm_stand_in, use_cache

ROUND_TRIP = {
    'vit-default': ('vit_tiny_convnn_all', dict(img_size=32, patch_size=4, num_classes=7)),
    'vit-options': ('vit_tiny_convnn_random', dict(img_size=32, patch_size=4, num_classes=7, num_neighbors=5,
                                                   num_samples=12, similarity='cosine', coords='append')),
    'vit-branch': ('vit_small_convnn_branch', dict(img_size=32, patch_size=8, branch_ratio=0.25, depth=3)),
    'resnet-options': ('resnet18_convnn_branch', dict(num_classes=10, branch_ratio=0.25, num_neighbors=4,
                                                      candidates='spatial', num_samples=16)),
    'vgg': ('vgg11_convnn_branch_pe', dict(num_classes=10)),
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    return use_cache(monkeypatch, tmp_path / 'hub')


@pytest.fixture
def restore_registry():
    """Undo tags registered by a test (timm's registry is process-global): the model files' default_cfgs as they
    were, registered again the way register_pretrained registers them."""
    import warnings
    from copy import deepcopy
    entrypoints = {a: timm.models.model_entrypoint(a) for a in timm.list_models('*convnn*')}
    files = {a: sys.modules[e.__module__].default_cfgs for a, e in entrypoints.items()}
    saved = {a: deepcopy(files[a][a]) for a in entrypoints}
    yield
    for a, cfgs in saved.items():
        if files[a][a] != cfgs:
            files[a][a] = cfgs
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                timm.models.register_model(entrypoints[a])


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _perturb(model):
    # make every tensor non-default so a silently re-initialised one is caught
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


@pytest.mark.parametrize('case', list(ROUND_TRIP))
def test_round_trip_hf_hub(case, cache, tmp_path, restore_registry):
    name, kwargs = ROUND_TRIP[case]
    model = _perturb(timm.create_model(name, **kwargs)).eval()
    folder = hub.save(model, tmp_path / 'export', repo_id=f'org/{case}')
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == name
    for k, v in kwargs.items():
        if k == 'num_classes':  # where timm and transformers both read it (not in model_args: see the next test)
            assert config['num_classes'] == v and 'num_classes' not in config['model_args']
        elif k != 'img_size':
            assert config['model_args'][k] == v, k
    cache.add_folder(f'org/{case}', folder)

    loaded = timm.create_model(f'hf-hub:org/{case}', pretrained=True).eval()
    assert type(loaded) is type(model) and _same_weights(model, loaded)
    assert hub.convnn_model_args(loaded) == hub.convnn_model_args(model)
    side = kwargs.get('img_size', 64)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))

    # the same weights through a registered tag whose hf_hub_id is the repo, and through a local file
    # (num_classes as in timm: a cfg with another class count drops the classifier on load)
    classes = dict(num_classes=model.num_classes)
    hub.register_pretrained(f'{name}.test_{case.replace("-", "_")}', hf_hub_id=f'org/{case}', **classes)
    tagged = timm.create_model(f'{name}.test_{case.replace("-", "_")}', pretrained=True, **kwargs)
    assert _same_weights(model, tagged)
    overlay = dict(file=str(folder / 'model.safetensors'), **classes)
    local = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    assert _same_weights(model, local)


def test_register_pretrained_tags_through_timm_registry(restore_registry, recwarn):
    arch = 'vit_tiny_convnn_random'
    before = timm.models.get_pretrained_cfg(arch)
    hub.register_pretrained(f'{arch}.later_in1k', hf_hub_id='org/later', notes='top-1 80.0')
    assert f'{arch}.later_in1k' in timm.list_pretrained(f'{arch}.*')
    cfg = timm.models.get_pretrained_cfg(f'{arch}.later_in1k')
    assert (cfg.hf_hub_id, cfg.architecture, cfg.tag, cfg.notes) == ('org/later', arch, 'later_in1k', 'top-1 80.0')
    assert cfg.input_size == before.input_size and not cfg.url
    assert timm.models.get_pretrained_cfg(arch) == before  # not the default unless asked
    hub.register_pretrained(f'{arch}.best_in1k', hf_hub_id='org/best', default=True)
    assert timm.models.get_pretrained_cfg(arch).hf_hub_id == 'org/best'  # pretrained=True on the bare name
    assert timm.list_pretrained(f'{arch}.*')[0] == f'{arch}.best_in1k'
    assert f'{arch}.later_in1k' in timm.list_pretrained(f'{arch}.*')
    assert timm.is_model(arch) and arch in timm.list_models('*convnn*')
    assert not [w for w in recwarn if 'Overwriting' in str(w.message)]
    with pytest.raises(ValueError, match='vit_tiny_patch16_224.*not a registered ConvNN'):
        hub.register_pretrained('vit_tiny_patch16_224.x', hf_hub_id='org/x')
    with pytest.raises(ValueError, match='arch.tag'):
        hub.register_pretrained(arch, hf_hub_id='org/x')


def _run_offline(code, hub_cache, *args):
    """Run ``code`` in a fresh Python as a user's machine does: HF_HUB_OFFLINE / HF_HUB_CACHE set before it starts."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(hub_cache))
    out = subprocess.run([sys.executable, '-c', code, *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


def test_hf_hub_loading_in_a_fresh_process_with_env_vars(tmp_path):
    # exactly what a user's machine does: HF_HUB_OFFLINE / HF_HUB_CACHE set before Python starts
    model = _perturb(timm.create_model('vit_tiny_convnn_random', img_size=32, patch_size=4, num_neighbors=6)).eval()
    folder = hub.save(model, tmp_path / 'export')
    HubCache(tmp_path / 'hub').add_folder('org/fresh', folder)
    x = torch.randn(1, 3, 32, 32)
    torch.save(x, tmp_path / 'x.pt')
    with torch.no_grad():
        expect = model(x)
    code = ('import sys, torch, timm, timm_convnn\n'
            'm = timm.create_model("hf-hub:org/fresh", pretrained=True).eval()\n'
            'torch.save(m(torch.load(sys.argv[1], weights_only=True)).detach(), sys.argv[2])\n')
    _run_offline(code, tmp_path / 'hub', tmp_path / 'x.pt', tmp_path / 'y.pt')
    assert torch.equal(torch.load(tmp_path / 'y.pt', weights_only=True), expect)


def test_transformers_timm_wrapper_loads_the_export(tmp_path):
    # transformers' AutoModel* classes load a timm repo through TimmWrapper, which calls
    # timm.create_model(architecture, num_classes=..., **model_args): with num_classes in model_args too (as timm's
    # save_for_hf writes it) that failed with "got multiple values for keyword argument 'num_classes'". A user's
    # fresh process, offline from the Hub cache, no `import timm_convnn` (zero-touch registration); and its
    # image-classification pipeline.
    import transformers
    if not transformers.utils.is_torch_available():  # e.g. transformers 5 with torch 2.5: its models are off
        pytest.skip(f'transformers {transformers.__version__} does not run models on torch {torch.__version__}')
    model = _perturb(timm.create_model('vit_tiny_convnn_random', img_size=32, patch_size=4, num_classes=7,
                                       num_neighbors=6)).eval()
    folder = hub.save(model, tmp_path / 'export')
    HubCache(tmp_path / 'hub').add_folder('org/wrapped', folder)
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / 'x.pt')
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 48, 3), dtype=np.uint8))
    image.save(tmp_path / 'image.png')
    exported_cfg = json.loads((folder / 'config.json').read_text())['pretrained_cfg']  # 32 px, as exported
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, pretrained_cfg=exported_cfg))
    with torch.no_grad():
        logits, pooled = model(x), model.forward_head(model.forward_features(x), pre_logits=True)
        probs = model(transform(image).unsqueeze(0)).softmax(-1)[0]
    code = ('import sys, torch\n'
            'from PIL import Image\n'
            'from transformers import AutoModel, AutoModelForImageClassification, pipeline\n'
            'x = torch.load(sys.argv[1], weights_only=True)\n'
            'classifier = AutoModelForImageClassification.from_pretrained("org/wrapped").eval()\n'
            'backbone = AutoModel.from_pretrained("org/wrapped").eval()\n'
            'top = pipeline("image-classification", model="org/wrapped")(Image.open(sys.argv[3]), top_k=3)\n'
            'with torch.no_grad():\n'
            '    torch.save((classifier(pixel_values=x).logits, backbone(pixel_values=x).pooler_output, top), '
            'sys.argv[2])\n')
    _run_offline(code, tmp_path / 'hub', tmp_path / 'x.pt', tmp_path / 'y.pt', tmp_path / 'image.png')
    got_logits, got_pooled, top = torch.load(tmp_path / 'y.pt', weights_only=True)
    assert got_logits.shape == (2, 7) and torch.equal(got_logits, logits) and torch.equal(got_pooled, pooled)
    # the pipeline preprocesses with the export's data config (timm's eval transform) and labels classes LABEL_i
    expect = probs.topk(3)
    assert [t['label'] for t in top] == [f'LABEL_{i}' for i in expect.indices.tolist()]
    assert torch.allclose(torch.tensor([t['score'] for t in top]), expect.values, atol=1e-5)


@pytest.mark.parametrize('name,source', [
    ('vit_tiny_convnn_random', 'vit_tiny_patch16_224.augreg_in21k_ft_in1k'),
    ('resnet18_convnn_branch', 'resnet18.a1_in1k'),
])
def test_warm_start_tag_from_timm_repo(name, source, cache, tmp_path):
    src, _ = add_timm_stand_in(cache, tmp_path, source)
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.tag == 'from_timm_' + source.split('.')[1] and cfg.hf_hub_id == f'timm/{source}'
    assert 'not ConvNN-trained' in cfg.notes and 'not measured' in cfg.notes
    model = timm.create_model(name, pretrained=True).eval()
    src_sd, sd = src.state_dict(), model.state_dict()
    loaded = [k for k in sd if k in src_sd]
    assert loaded and all(torch.equal(sd[k], src_sd[k]) for k in loaded)
    assert timm.data.resolve_data_config({}, model=model)['input_size'] == (3, 224, 224)
    assert torch.isfinite(model(torch.randn(1, 3, 224, 224))).all()
    # timm's own pretrained-loading test (in_chans / num_classes adaptation) for the tag
    from .timm_sdist import import_timm_test_models
    import_timm_test_models().test_model_load_pretrained(name, 1)


WARM_TAGS = [n for n in timm.list_pretrained('*convnn*') if '.from_timm_' in n]


@pytest.mark.parametrize('name', WARM_TAGS)
def test_warm_start_tag_preprocessing_is_the_source_weights(name):
    # a warm-start tag loads timm's weights: the preprocessing they were trained / evaluated with (train and test
    # sizes, crop, interpolation, mean, std), their classes and license are the source tag's
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.hf_hub_id.startswith('timm/')
    source = timm.models.get_pretrained_cfg(cfg.hf_hub_id[len('timm/'):])
    assert source is not None and cfg.tag == 'from_timm_' + source.tag
    keys = ('input_size', 'test_input_size', 'min_input_size', 'crop_pct', 'test_crop_pct', 'crop_mode',
            'interpolation', 'mean', 'std', 'num_classes', 'license')
    assert {k: getattr(cfg, k) for k in keys} == {k: getattr(source, k) for k in keys}
    for kw in ({}, dict(use_test_size=True)):
        assert timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict(), **kw) == \
            timm.data.resolve_data_config({}, pretrained_cfg=source.to_dict(), **kw)


def test_no_weights_and_unknown_tag_list_the_tags_with_weights():
    with pytest.raises(RuntimeError, match=r'Tags with weights: vit_tiny_convnn_all\.from_timm_augreg_in21k_ft_in1k'):
        timm.create_model('vit_tiny_convnn_all.nonexistent', pretrained=True)
    match = r'has no pretrained weights\. Tags with weights: resnet18_convnn\.from_timm'
    with pytest.raises(RuntimeError, match=match):
        timm.create_model('resnet18_convnn', pretrained=True, pretrained_cfg=dict(architecture='resnet18_convnn'))


def test_offline_error_of_an_older_huggingface_hub_is_explained(cache, tmp_path, monkeypatch):
    # huggingface_hub < 1.0 raises LocalEntryNotFoundError offline for a file that is not cached, and derives it from
    # FileNotFoundError and ValueError; a ValueError from building the model passes through untouched, this one must
    # not (with huggingface_hub 0.26 it did, and the user saw the hub's generic text only)
    good = hub.save(timm.create_model('vit_tiny_convnn_all', img_size=32, patch_size=4), tmp_path / 'm')
    cache.add_repo('org/old-hub', {'config.json': good / 'config.json'})
    old_error = type('LocalEntryNotFoundError', (FileNotFoundError, ValueError),
                     {'__module__': 'huggingface_hub.errors'})
    download = timm.models._hub.hf_hub_download

    def old_hub_download(repo_id, filename, *args, **kwargs):
        if filename == 'config.json':
            return download(repo_id, filename, *args, **kwargs)
        raise old_error('An error happened while trying to locate the file on the Hub and we cannot find the '
                        'requested files in the local cache.')

    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', old_hub_download)
    with pytest.raises(RuntimeError, match=r'org/old-hub.*not in the local Hugging Face cache \(cached files of this '
                                           r'repo: config.json\)'):
        timm.create_model('hf-hub:org/old-hub', pretrained=True)
    with pytest.raises(ValueError, match='num_neighbors'):  # a bad option still passes through as itself
        timm.create_model('hf-hub:org/old-hub', pretrained=True, num_neighbors=0)


def test_bad_checkpoints_fail_clearly(cache, tmp_path):
    kw = dict(img_size=32, patch_size=4)
    good = hub.save(timm.create_model('vit_tiny_convnn_all', num_neighbors=16, **kw), tmp_path / 'k16')

    # config.json but no weights file: a FileNotFoundError as well (timm's and huggingface_hub's own error there)
    cache.add_repo('org/no-weights', {'config.json': good / 'config.json'})
    with pytest.raises(FileNotFoundError, match=r'org/no-weights.*not in the local Hugging Face cache \(cached files '
                                                r'of this repo: config.json\)') as info:
        timm.create_model('hf-hub:org/no-weights', pretrained=True)
    assert isinstance(info.value, RuntimeError)  # (and a PretrainedWeightsError, as every loading failure)

    # a local weights file that is not there
    with pytest.raises(FileNotFoundError, match=r'from /nonexistent/w.pth: no such file\.$'):
        timm.create_model('vit_tiny_convnn_all', pretrained=True,
                          pretrained_cfg_overlay=dict(file='/nonexistent/w.pth'), **kw)

    # truncated safetensors file
    blob = (good / 'model.safetensors').read_bytes()
    cache.add_repo('org/truncated', {'config.json': good / 'config.json', 'model.safetensors': blob[:len(blob) // 3]})
    with pytest.raises(RuntimeError, match=r'org/truncated \(file model.safetensors\).*truncated or corrupt'):
        timm.create_model('hf-hub:org/truncated', pretrained=True)

    # local .pth files that torch.load cannot read, or that hold no state dict: what is wrong with the file, not
    # torch's advice to retry with weights_only=False (wrong for a damaged file)
    state = timm.create_model('vit_tiny_convnn_all', **kw).state_dict()
    torch.save(state, tmp_path / 'whole.pth')
    whole = (tmp_path / 'whole.pth').read_bytes()
    torch.save([1, 2], tmp_path / 'list.pth')
    torch.save(timm.create_model('vit_tiny_convnn_all', **kw), tmp_path / 'model.pth')
    for name, data, why in (('garbage', b'garbage' * 100, 'readable torch checkpoint'), ('empty', b'', 'EOFError'),
                            ('cut', whole[:len(whole) // 2], 'PytorchStreamReader failed'),
                            ('list', None, 'does not hold a state dict'),
                            ('model', None, r'holds pickled objects, not a state dict .*Unsupported global')):
        if data is not None:
            (tmp_path / f'{name}.pth').write_bytes(data)
        with pytest.raises(RuntimeError, match=rf'from {tmp_path}/{name}.pth: .*{why}') as info:
            timm.create_model('vit_tiny_convnn_all', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / f'{name}.pth')), **kw)
        assert 'weights_only=False' not in str(info.value)

    # a checkpoint with another K: shape mismatch, nothing half-loaded
    cache.add_folder('org/k16', good)
    with pytest.raises(RuntimeError, match=r'org/k16.*does not match .*num_neighbors'):
        timm.create_model('vit_tiny_convnn_all', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='org/k16'),
                          **kw)

    # config.json (and weights) of another architecture
    other = hub.save(timm.create_model('resnet18_convnn_branch', num_classes=10), tmp_path / 'resnet')
    cache.add_folder('org/resnet', other)
    with pytest.raises(RuntimeError, match=r'org/resnet.*config.json says it is a resnet18_convnn_branch checkpoint'):
        timm.create_model('vit_tiny_convnn_all', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='org/resnet'),
                          **kw)

    # offline, nothing cached
    with pytest.raises(FileNotFoundError, match=r'timm/vit_base_patch16_224\.augreg2_in21k_ft_in1k.*nothing of this '
                                                r'repo is cached.*HF_HUB_OFFLINE'):
        timm.create_model('vit_base_convnn_all_k16', pretrained=True)


@pytest.mark.parametrize('name', ['vit_tiny_convnn_random', 'resnet50_convnn_branch', 'vgg11_convnn'])
def test_model_cards_render_for_every_family(name):
    model = timm.create_model(name, device='meta')
    text = hub.render_model_card(model, 'org/card')
    assert '$' not in text.replace('$$', '')
    assert text.startswith('---\n') and 'library_name: timm' in text
    assert f'`{name}`' in text and 'hf-hub:org/card' in text and 'arXiv 2511.14137' in text
    assert '| `num_neighbors` | `9` |' in text and 'Not measured' in text and '@article{kang2025convnn' in text
    assert ('ViT with ConvNN' in text) == name.startswith('vit')
    assert "pipeline('image-classification', model='org/card')" in text  # what the transformers test runs


@pytest.mark.parametrize('name,kwargs', [
    ('vit_small_convnn_branch', dict(img_size=32, patch_size=8, depth=1, branch_ratio=0.25)),
    ('resnet18_convnn_branch', dict(layers=(1, 1, 1, 1), branch_ratio=0.75)),
    ('vit_tiny_convnn_random', dict(img_size=32, patch_size=4, depth=1)),
])
def test_exported_args_and_card_hold_every_option_of_the_layers(name, kwargs, cache, tmp_path):
    # every ConvNN option (the model kwargs the model files accept) is exported with the value the layers hold, set
    # at build or later on the layers themselves; branch_ratio for the branch models only
    from timm_convnn.layers import ConvNN2d, ConvNNAttention
    from timm_convnn.models.vit_convnn import CONVNN_KWARGS
    opts = dict(num_neighbors=5, candidates='random', num_samples=12, similarity='euclidean', weighting='ones',
                aggregation='standard', coords='append', neighbor_order='position')
    model = timm.create_model(name, num_classes=3, **opts, **kwargs)
    layers = [m for m in model.modules() if isinstance(m, (ConvNNAttention, ConvNN2d))]
    for m in layers:
        m.coord_scale = 2.5  # (on the layers only, not a create_model argument)
    expect = dict(opts, coord_scale=2.5)
    if 'branch_ratio' in kwargs:
        expect['branch_ratio'] = kwargs['branch_ratio']
    assert set(CONVNN_KWARGS) - set(expect) == set(() if 'branch' in name else ('branch_ratio',))
    assert hub.convnn_model_args(model) == expect
    folder = hub.save(model, tmp_path / 'export')
    model_args = json.loads((folder / 'config.json').read_text())['model_args']
    assert {k: v for k, v in model_args.items() if k in CONVNN_KWARGS} == expect
    card = (folder / 'README.md').read_text()
    for k, v in expect.items():
        assert f'| `{k}` | `{v!r}` |' in card, k
    assert ('`branch_ratio`' in card) == ('branch_ratio' in kwargs)
    cache.add_folder('org/options', folder)  # and the loaded model's layers are built with them
    assert hub.convnn_model_args(timm.create_model('hf-hub:org/options', pretrained=True)) == expect


def test_card_of_a_non_square_model_states_height_x_width(tmp_path):
    # timm's input_size is (C, H, W); the card's "Input" line is H x W (as the export tests read it)
    model = timm.create_model('vit_tiny_convnn_all', img_size=(32, 64), patch_size=8, depth=1, num_classes=3)
    assert timm.data.resolve_input_data_config(model)['input_size'] == (3, 32, 64)
    assert '- **Input:** 32 x 64, mean' in hub.render_model_card(model)
    hub.save(model, tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text())['pretrained_cfg']['input_size'] == [3, 32, 64]
    assert '- **Input:** 32 x 64, mean' in (tmp_path / 'README.md').read_text()


@pytest.mark.parametrize('name,kwargs,size', [
    ('vit_tiny_convnn_all_k16', dict(img_size=32, patch_size=4), (3, 32, 32)),
    ('resnet18_convnn_branch', dict(in_chans=1), (1, 224, 224)),
])
def test_exported_card_states_the_config_it_ships_with(name, kwargs, size, tmp_path):
    # the card's input size, mean / std and tag are config.json's (the model as built: 32 px, 1 channel), not the
    # architecture's default cfg (224 px, and the warm-start tag of weights the export no longer holds)
    model = timm.create_model(name, num_classes=10, depth=1, **kwargs) if name.startswith('vit') else \
        timm.create_model(name, num_classes=10, layers=(1, 1, 1, 1), **kwargs)
    assert model.pretrained_cfg['tag'] and tuple(model.pretrained_cfg['input_size']) == (3, 224, 224)
    hub.save(model, tmp_path)
    cfg = json.loads((tmp_path / 'config.json').read_text())['pretrained_cfg']
    assert tuple(cfg['input_size']) == size and cfg['tag'] is None
    text = (tmp_path / 'README.md').read_text()
    assert f'- **Input:** {size[1]} x {size[2]}, mean {tuple(cfg["mean"])}, std {tuple(cfg["std"])}' in text
    assert f'- **Architecture:** `{name}`, family' in text and '(tag' not in text
    # without a repo id the usage loads this folder (the bare name would load the architecture's default weights)
    assert "timm.create_model('local-dir:path/to/this/folder', pretrained=True)" in text
    assert text == hub.render_model_card(model, pretrained_cfg=cfg)  # and a standalone card says the same
    assert hub.render_model_card(model) == text


def _train_checkpoint(tmp_path, ema=True):
    """A checkpoint laid out as timm train.py writes it, plus its summary.csv."""
    model = _perturb(timm.create_model('vit_tiny_convnn_random', img_size=32, patch_size=4, num_classes=10,
                                       num_neighbors=6))
    ema_model = _perturb(timm.create_model('vit_tiny_convnn_random', img_size=32, patch_size=4, num_classes=10,
                                           num_neighbors=6))
    args = argparse.Namespace(model='vit_tiny_convnn_random', num_classes=10, img_size=32, in_chans=None,
                              model_kwargs={'patch_size': 4, 'num_neighbors': 6, 'img_size': 32}, epochs=3, lr=1e-3,
                              opt='adamw', weight_decay=0.05, batch_size=64, sched='cosine', seed=42)
    ckpt = {'epoch': 2, 'arch': 'vit_tiny_convnn_random', 'state_dict': model.state_dict(), 'args': args,
            'version': 2, 'metric': 91.5}
    if ema:
        ckpt['state_dict_ema'] = ema_model.state_dict()
    run = tmp_path / 'run'
    run.mkdir()
    torch.save(ckpt, run / 'model_best.pth.tar')
    with open(run / 'summary.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'])
        w.writerows([[0, 2.1, 1.9, 55.0, 90.0, 1e-3], [1, 1.2, 0.8, 91.5, 99.0, 5e-4],
                     [2, 0.9, 0.85, 90.0, 99.5, 1e-4]])
    return model, ema_model, run


@pytest.mark.parametrize('ema', [False, True])
def test_export_train_checkpoint_cli(ema, cache, tmp_path):
    model, ema_model, run = _train_checkpoint(tmp_path)
    out = tmp_path / 'exported'
    argv = ['export', str(run / 'model_best.pth.tar'), str(out), '--repo-id', 'org/digits', '--dataset', 'digits']
    assert cli_main(argv + (['--ema'] if ema else [])) == 0
    card = (out / 'README.md').read_text()
    assert '| best top-1 (epoch 1) | 91.50 |' in card and '| last-epoch top-1 | 90.00 |' in card
    assert "| `opt` | `'adamw'` |" in card and 'digits' in card
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['num_neighbors'] == 6 and config['num_classes'] == 10
    assert 'warm start' not in json.dumps(config).lower()
    cache.add_folder('org/digits', out)
    loaded = timm.create_model('hf-hub:org/digits', pretrained=True)
    assert _same_weights(ema_model if ema else model, loaded)


@pytest.mark.parametrize('name, model_kwargs, run_args, data', [
    # a 1-channel CIFAR-style run: channels from --input-size, --gp, the run's own mean / std / crop
    ('resnet18_convnn_branch', dict(in_chans=1, global_pool='catavgmax'),
     dict(in_chans=None, input_size=[1, 32, 32], gp='catavgmax', mean=[0.5], std=[0.25], crop_pct=1.0,
          model_kwargs={}),
     dict(input_size=[1, 32, 32], mean=[0.5], std=[0.25], crop_pct=1.0)),
    # --img-size never reaches create_model in train.py: a dynamic-size ViT keeps its 224 px build, run at 64 px
    ('vit_tiny_convnn_all', dict(patch_size=16, dynamic_img_size=True),
     dict(in_chans=None, img_size=64, input_size=None, gp=None, mean=None, std=None, crop_pct=None,
          model_kwargs={'dynamic_img_size': True}),
     dict(input_size=[3, 64, 64])),
])
def test_export_rebuilds_the_run_as_train_py_built_it(name, model_kwargs, run_args, data, cache, tmp_path):
    # timm's train.py: create_model(in_chans=--in-chans or --input-size[0], num_classes, global_pool=--gp, ...,
    # **--model-kwargs); its validation preprocessing is resolve_data_config(args, model): config.json records it
    model = _perturb(timm.create_model(name, num_classes=10, **model_kwargs))
    args = argparse.Namespace(model=name, num_classes=10, bn_momentum=None, bn_eps=None, interpolation='',
                              epochs=3, **run_args)
    run = tmp_path / 'run'
    run.mkdir()
    torch.save({'epoch': 2, 'arch': name, 'state_dict': model.state_dict(), 'args': args}, run / 'last.pth.tar')
    out = hub.export_checkpoint(run / 'last.pth.tar', tmp_path / 'exported')
    cfg = json.loads((out / 'config.json').read_text())
    for key, value in data.items():
        assert cfg['pretrained_cfg'][key] == value, key
    assert f'- **Input:** {data["input_size"][1]} x {data["input_size"][2]}' in (out / 'README.md').read_text()
    cache.add_folder('org/run', out)
    loaded = timm.create_model('hf-hub:org/run', pretrained=True)
    assert _same_weights(model, loaded)
    assert timm.data.resolve_model_data_config(loaded)['input_size'] == tuple(data['input_size'])
    if 'global_pool' in model_kwargs:
        assert loaded.global_pool.pool_type == model_kwargs['global_pool']


def test_export_and_push_mistakes_are_one_line_errors(tmp_path, capsys, cache):
    _, _, run = _train_checkpoint(tmp_path, ema=False)
    ckpt = str(run / 'model_best.pth.tar')
    (tmp_path / 'a_file').write_text('')

    def error(argv, *words):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f'timm-convnn {argv[0]}: error: ') and 'Traceback' not in err, err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err

    out = str(tmp_path / 'out')
    error(['export', ckpt, out, '--model-kwargs', 'embed_dim=96'], 'weights do not fit vit_tiny_convnn_random')
    error(['export', ckpt, out, '--model', 'vit_small_convnn_random'], 'weights do not fit vit_small_convnn_random',
          '(and ')
    error(['export', ckpt, out, '--model', 'vit_tiny_convnn_randm'], "unknown model 'vit_tiny_convnn_randm'",
          'vit_tiny_convnn_random')
    error(['export', ckpt, out, '--summary', str(tmp_path / 'nope.csv')], 'no summary file at ')
    error(['export', ckpt, str(tmp_path / 'a_file')], 'a_file')
    assert not (tmp_path / 'out').exists()
    # an exported folder is uploaded as it is: export options with it are refused, not ignored
    assert cli_main(['export', ckpt, out]) == 0
    error(['push', out, 'org/x', '--dry-run', '--model', 'vgg11_convnn', '--out-dir', str(tmp_path / 'new')],
          'is an exported folder, uploaded as it is: model_name, out_dir')
    assert not (tmp_path / 'new').exists()
    assert cli_main(['push', out, 'org/x', '--dry-run']) == 0
    assert capsys.readouterr().out.startswith(f'dry run: checked exported folder {out} (')
    # info on a local-dir: name: the architecture its config names
    assert cli_main(['info', f'local-dir:{out}', '--json']) == 0
    assert json.loads(capsys.readouterr().out)['entrypoint'].endswith('.vit_tiny_convnn_random')


def test_export_ema_missing_is_a_clear_error(tmp_path, capsys):
    _, _, run = _train_checkpoint(tmp_path, ema=False)
    with pytest.raises(ValueError, match='has no state_dict_ema .*--model-ema'):
        hub.export_checkpoint(run / 'model_best.pth.tar', tmp_path / 'out', use_ema=True)
    # a model kwarg the architecture does not take: one line naming it, not timm's TypeError traceback
    assert cli_main(['export', str(run / 'model_best.pth.tar'), str(tmp_path / 'out'), '--model-kwargs', 'foo=1']) == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-convnn export: error: cannot build vit_tiny_convnn_random with ') and "'foo': 1" in err
    assert 'Traceback' not in err and not (tmp_path / 'out').exists()


def test_export_of_unreadable_checkpoints_fails_in_one_line(tmp_path, capsys):
    _, _, run = _train_checkpoint(tmp_path, ema=False)
    good = (run / 'model_best.pth.tar').read_bytes()
    files = {'garbage.pth': b'not a checkpoint\n', 'truncated.pth': good[:len(good) // 2], 'empty.pth': b'',
             'junk.pth': b'junk\n'}  # (junk: the weights-only unpickler raises KeyError)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({'weights': torch.ones(2)}, tmp_path / 'plain.pth')
    cases = [('missing.pth', FileNotFoundError, 'no checkpoint file at'),
             ('plain.pth', ValueError, 'not a timm train.py checkpoint')]
    cases += [(name, ValueError, 'not a readable torch checkpoint') for name in files]
    for name, exc, message in cases:
        path = tmp_path / name
        with pytest.raises(exc, match=message):
            hub.load_train_checkpoint(path)
        for command in (['export', str(path), str(tmp_path / 'out')], ['push', str(path), 'org/x', '--dry-run']):
            assert cli_main(command) == 2
            err = capsys.readouterr().err
            assert err.startswith(f'timm-convnn {command[0]}: error: ') and message in err and str(path) in err
            assert 'Traceback' not in err and 'weights_only' not in err  # not torch's advice to unpickle anyway


def _load_error(load, path):
    try:
        load(path)
    except Exception as e:
        return e
    raise AssertionError(f'{path} loaded')


@pytest.mark.parametrize('name', ['empty', 'garbage', 'truncated', 'legacy_truncated', 'legacy_cut_short'])
def test_unreadable_checkpoint_errors_are_recognised(name, tmp_path):
    # what torch.load (weights only) and timm's load_state_dict around it raise for a file that is no checkpoint:
    # EOFError, pickle.UnpicklingError, and timm's RuntimeError (about weights_only) or torch's zip-reader one; for a
    # damaged file of torch's legacy (non-zip) format, struct.error or torch's 'unexpected EOF' RuntimeError
    path = tmp_path / 'ckpt.pth'
    torch.save({'w': torch.ones(8)}, path, _use_new_zipfile_serialization=not name.startswith('legacy'))
    data = path.read_bytes()
    files = {'empty': b'', 'garbage': b'not a checkpoint\n', 'truncated': data[:len(data) // 2],
             'legacy_truncated': data[:len(data) // 2], 'legacy_cut_short': data[:-3]}
    path.write_bytes(files[name])
    errors = [_load_error(lambda p: torch.load(p, weights_only=True), path),
              _load_error(timm.models.load_state_dict, path)]
    assert all(hub.is_unreadable_checkpoint(e) for e in errors), [repr(e) for e in errors]


@pytest.mark.parametrize('error, unreadable', [
    (pickle.UnpicklingError(), True),
    (EOFError(), True),
    (RuntimeError('weights_only=True blocked loading this checkpoint'), True),
    (RuntimeError('PytorchStreamReader failed reading zip archive'), True),
    (RuntimeError('Error(s) in loading state_dict for ResNet:\n\tsize mismatch for fc.weight'), False),
    (TypeError("load() got an unexpected keyword argument 'weights_only'"), False),  # (a torch without it)
])
def test_is_unreadable_checkpoint_by_error_type(error, unreadable):
    # the file's fault (its bytes cannot be read) vs a state dict that does not fit the model, or anything else
    assert hub.is_unreadable_checkpoint(error) is unreadable


def test_export_of_a_ddp_checkpoint_strips_the_module_prefix(cache, tmp_path):
    # a run trained with DistributedDataParallel may save its weights as 'module.<name>': the export holds the
    # model's own names (a strict load of the rebuilt model), EMA or not
    from safetensors.torch import load_file
    model, ema_model, run = _train_checkpoint(tmp_path)
    ckpt = torch.load(run / 'model_best.pth.tar', weights_only=False)
    for key in ('state_dict', 'state_dict_ema'):
        ckpt[key] = {f'module.{k}': v for k, v in ckpt[key].items()}
    torch.save(ckpt, run / 'ddp.pth.tar')
    _, state_dict, _ = hub.load_train_checkpoint(run / 'ddp.pth.tar')
    assert state_dict.keys() == model.state_dict().keys()
    for ema, source in ((False, model), (True, ema_model)):
        out = hub.export_checkpoint(run / 'ddp.pth.tar', tmp_path / f'exported_{ema}', use_ema=ema)
        assert load_file(str(out / 'model.safetensors')).keys() == source.state_dict().keys()
        cache.add_folder(f'org/ddp-{ema}', out)
        assert _same_weights(source, timm.create_model(f'hf-hub:org/ddp-{ema}', pretrained=True))


def test_train_summary_of_a_resumed_run(tmp_path):
    # a resumed train.py run appends its epochs to summary.csv after a header row of its own (train.py writes the
    # header whenever a run starts): every epoch of both runs counts, the repeated header is no epoch
    header = ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
    first = [[0, 2.1, 1.9, 55.0, 90.0, 1e-3], [1, 1.2, 0.8, 70.0, 95.0, 5e-4]]
    resumed = [[2, 1.0, 0.7, 82.5, 97.0, 4e-4], [3, 0.9, 0.75, 80.0, 98.5, 1e-4]]
    with open(tmp_path / 'summary.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerows([header, *first, header, *resumed])
    best = max(first + resumed, key=lambda r: r[3])
    assert hub.read_train_summary(tmp_path / 'summary.csv') == dict(
        epochs=4, best_epoch=best[0], best_top1=best[3], best_top5=best[4], last_top1=resumed[-1][3],
        last_top5=resumed[-1][4], last_eval_loss=resumed[-1][2])


def test_bad_train_records_name_what_is_wrong(tmp_path):
    with open(tmp_path / 'summary.csv', 'w', newline='') as f:
        csv.writer(f).writerows([['epoch', 'eval_loss', 'eval_top1', 'eval_top5'], [0, 1.0, 50.0, 90.0],
                                 [1, 0.9, 'abc', 91.0]])
    with pytest.raises(ValueError, match=r"summary.csv: column eval_top1 of the row of epoch '1' is not a number: "
                                         r"'abc'"):
        hub.read_train_summary(tmp_path / 'summary.csv')
    with pytest.raises(ValueError, match=r"model_kwargs must be a dict .*; got str 'img_size=32'"):
        hub.train_model_kwargs(dict(model_kwargs='img_size=32'))
    # hub.save writes ConvNN models only (a ConvNN model card, ConvNN options)
    with pytest.raises(ValueError, match='ResNet has no ConvNN layer: save timm.s own models with'):
        hub.save(timm.create_model('resnet18', num_classes=3), tmp_path / 'plain')
    assert not (tmp_path / 'plain').exists()
    # (a branch model whose lambda leaves no ConvNN channel is still a ConvNN model)
    assert (hub.save(timm.create_model('resnet18_convnn_branch', branch_ratio=0.0, num_classes=3), tmp_path / 'b0')
            / 'config.json').is_file()


@pytest.mark.parametrize('args, expect', [
    # timm's train.py: create_model(in_chans=--in-chans, else --input-size[0], num_classes=--num-classes,
    # global_pool=--gp, bn_momentum=--bn-momentum, bn_eps=--bn-eps, **--model-kwargs) (drop rates and --img-size
    # change no weights / are not passed)
    (dict(in_chans=None, input_size=[1, 32, 32], num_classes=10, gp='avgmax', bn_momentum=0.05, bn_eps=1e-4,
          model_kwargs={'patch_size': 4, 'img_size': 32}, img_size=48, drop=0.1, drop_path=0.2),
     dict(in_chans=1, num_classes=10, global_pool='avgmax', bn_momentum=0.05, bn_eps=1e-4, patch_size=4, img_size=32)),
    (dict(in_chans=2, input_size=[1, 32, 32], num_classes=None, gp=None, bn_momentum=None, bn_eps=None,
          model_kwargs={}),
     dict(in_chans=2)),
    (dict(in_chans=None, input_size=None, num_classes=None, gp=None, bn_momentum=None, bn_eps=None,
          model_kwargs=None),
     dict()),
])
def test_train_model_kwargs_are_what_train_py_passes_to_create_model(args, expect):
    assert hub.train_model_kwargs(args) == expect


def test_push_uploads_exactly_the_exported_files(tmp_path, monkeypatch):
    model, _, run = _train_checkpoint(tmp_path)
    record = {}

    def recorder(folder, repo_id, token, private, commit_message):
        record.update(repo_id=repo_id, token=token, private=private,
                      files={p.name: p.read_bytes() for p in folder.iterdir()})
        return 'recorded'

    monkeypatch.setattr(hub, '_hf_upload', recorder)
    assert cli_main(['push', str(run / 'model_best.pth.tar'), 'org/pushed', '--private']) == 0
    assert record['repo_id'] == 'org/pushed' and record['private'] is True
    assert sorted(record['files']) == ['README.md', 'config.json', 'model.safetensors']
    assert json.loads(record['files']['config.json'])['architecture'] == 'vit_tiny_convnn_random'
    assert b'hf-hub:org/pushed' in record['files']['README.md']
    from safetensors.torch import load
    weights = load(record['files']['model.safetensors'])
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())

    # --dry-run writes the folder and uploads nothing
    record.clear()
    assert cli_main(['push', str(run / 'model_best.pth.tar'), 'org/pushed', '--dry-run',
                     '--out-dir', str(tmp_path / 'dry')]) == 0
    assert not record and sorted(p.name for p in (tmp_path / 'dry').iterdir()) == [
        'README.md', 'config.json', 'model.safetensors']
    with pytest.raises(ValueError, match='org/name'):
        hub.push(run / 'model_best.pth.tar', 'no-org', dry_run=True)


def test_push_removes_its_temporary_folder(tmp_path, monkeypatch):
    # without --out-dir the export goes to a temporary folder: removed after the upload and after a failure (each
    # push left a ViT export behind before); a dry run keeps it, to be looked at
    _, _, run = _train_checkpoint(tmp_path)
    ckpt = run / 'model_best.pth.tar'
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
    (tmp_path / 'tmp').mkdir()
    seen = []

    def upload(folder, *args):
        seen.append(sorted(p.name for p in folder.iterdir()))
        return 'ok'

    folder, result = hub.push(ckpt, 'org/x', uploader=upload)
    assert result == 'ok' and seen == [['README.md', 'config.json', 'model.safetensors']] and not folder.exists()

    def fail(folder, *args):
        raise ConnectionError('offline')

    with pytest.raises(ConnectionError):
        hub.push(ckpt, 'org/x', uploader=fail)
    (tmp_path / 'bad.pth').write_bytes(b'junk')
    with pytest.raises(ValueError, match='not a readable'):
        hub.push(tmp_path / 'bad.pth', 'org/x', uploader=upload)
    assert list((tmp_path / 'tmp').iterdir()) == []
    folder, result = hub.push(ckpt, 'org/x', dry_run=True)
    assert result is None and folder.parent == tmp_path / 'tmp' and (folder / 'model.safetensors').exists()
    out = tmp_path / 'kept'
    assert hub.push(ckpt, 'org/x', uploader=upload, out_dir=out)[0] == out and (out / 'config.json').exists()


def test_weights_table_states_what_each_tag_holds(restore_registry):
    # a tag registered for ConvNN-trained weights shows its notes (its top-1), or points at its model card; a
    # warm-start tag (the ConvNN layers new) is never measured
    arch = 'vit_tiny_convnn_random'
    hub.register_pretrained(f'{arch}.trained_in1k', hf_hub_id='org/trained', notes='top-1 71.3')
    hub.register_pretrained(f'{arch}.plain_in1k', hf_hub_id='org/plain')
    rows = {line.split(' | ')[0][3:-1]: line for line in hub.weights_table().splitlines()[2:]}
    assert rows[f'{arch}.trained_in1k'] == f'| `{arch}.trained_in1k` | `org/trained` | yes | top-1 71.3 |'
    assert rows[f'{arch}.plain_in1k'] == f'| `{arch}.plain_in1k` | `org/plain` | yes | see model card |'
    warm = f'{arch}.from_timm_augreg_in21k_ft_in1k'
    assert rows[warm] == (f'| `{warm}` | `timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k` | '
                          f'no: warm start (ConvNN layers new) | not measured |')
    assert len(rows) == len(timm.list_pretrained('*convnn*'))


def test_readme_weights_table_is_current():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    block = readme.split('<!-- weights-table:begin -->')[1].split('<!-- weights-table:end -->')[0]
    assert block.strip() == hub.weights_table()
    assert len(timm.list_pretrained('*convnn*')) == 30
