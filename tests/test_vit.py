"""ViT family: registry, warm start from timm ViT weights, kwargs, data config, determinism, parameter counts."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import timm
import timm_convnn  # noqa: F401  (registers the models)
from timm_convnn.layers import ConvNNAttention, ConvNNBranchAttention
from timm_convnn.models.vit_convnn import checkpoint_filter_fn

SIZES = ('tiny', 'small', 'base')
MODES = ('all', 'all_k16', 'random', 'random_k16', 'spatial', 'spatial_k16', 'branch')
VIT_NAMES = sorted(f'vit_{s}_convnn_{m}' for s in SIZES for m in MODES)


def test_registry_lists_every_vit_name():
    names = timm.list_models('vit_*_convnn_*')
    assert names == VIT_NAMES
    assert set(VIT_NAMES) <= set(timm.list_models('*convnn*'))
    for name in VIT_NAMES:
        assert 'convnn' in name
        assert timm.models.get_pretrained_cfg(name) is not None


def test_names_never_collide_with_timm():
    code = 'import json, timm; print(json.dumps(timm.list_models()))'
    env = dict(os.environ, TIMM_CONVNN_AUTOLOAD='0')  # timm alone (installed, the plugin registers with timm)
    timm_only = set(json.loads(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                                              check=True, env=env).stdout))
    ours = set(timm.list_models('*convnn*'))
    assert not ours & timm_only
    assert not any('convnn' in n for n in timm_only)
    # after the plugin import every timm model still maps to timm's own module: our modules list only our names
    modules = [m for m in timm.list_modules() if 'convnn' in m]
    assert sorted(modules) == ['resnet_convnn', 'vgg_convnn', 'vit_convnn']
    assert set().union(*(timm.list_models(module=m) for m in modules)) == ours
    assert set(timm.list_models()) == timm_only | ours


def _vit_weights(name, randomize=False):
    src = timm.create_model(name).eval()
    if randomize:  # variance-preserving random weights: logits depend strongly on the input
        with torch.no_grad():
            for n, p in src.named_parameters():
                if p.dim() >= 2 and 'embed' not in n and 'token' not in n:
                    p.normal_(std=p[0].numel() ** -0.5)
                elif n.endswith('norm1.weight') or n.endswith('norm2.weight') or n.endswith('norm.weight'):
                    p.normal_(1., 0.2)
                else:
                    p.normal_(std=0.2)
    return src


def test_warm_start_k_equals_n_reproduces_timm_vit(tmp_path):
    src = _vit_weights('vit_tiny_patch16_224', randomize=True)
    path = tmp_path / 'vit_tiny.safetensors'
    save_file(src.state_dict(), str(path))
    # through timm's own pretrained loading path (pretrained_cfg file) and our checkpoint_filter_fn
    model = timm.create_model('vit_tiny_convnn_all', pretrained=True, num_neighbors=197,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert all(torch.all(b.attn.aggregate.weight == 1) for b in model.blocks)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref, out = src(x), model(x)
    assert ref.std() > 0.3 and (ref[0] - ref[1]).abs().max() > 0.3  # informative, input-dependent logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', ['vit_tiny_convnn_all', 'vit_tiny_convnn_random', 'vit_tiny_convnn_branch'])
def test_warm_start_loads_every_tensor(name):
    src = _vit_weights('vit_tiny_patch16_224')
    model = timm.create_model(name).eval()
    sd = checkpoint_filter_fn(src.state_dict(), model)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in src.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    new = [k for k in model.state_dict() if k not in src.state_dict()]
    assert new and all('.attn.aggregate.weight' in k for k in new)
    out = model(torch.randn(1, 3, 224, 224))
    assert torch.isfinite(out).all()
    # only the aggregation weights are filled in: any other tensor the checkpoint lacks still fails the load
    for missing in ('blocks.0.attn.qkv.weight', 'blocks.1.attn.proj.bias', 'blocks.2.norm1.weight'):
        partial = {k: v for k, v in src.state_dict().items() if k != missing}
        with pytest.raises(RuntimeError, match=f'Missing key.*{missing}'):
            model.load_state_dict(checkpoint_filter_fn(partial, model), strict=True)


def test_model_kwargs_reach_every_layer():
    model = timm.create_model('vit_tiny_convnn_random', num_neighbors=12, img_size=32, patch_size=4)
    assert model.patch_embed.grid_size == (8, 8)
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        assert type(attn) is ConvNNAttention
        assert (attn.num_neighbors, attn.candidates, attn.num_samples) == (12, 'random', 32)
        assert attn.num_prefix_tokens == 1 and attn.grid_size == (8, 8) and attn.sample_seed == i
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)

    opts = dict(similarity='cosine', weighting='ones', aggregation='standard', coords='append', num_samples=48,
                neighbor_order='position', coord_scale=2.0)
    model = timm.create_model('vit_tiny_convnn_spatial', img_size=64, patch_size=8, num_classes=10, **opts)
    for blk in model.blocks:
        assert all(getattr(blk.attn, k) == v for k, v in opts.items())
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    model = timm.create_model('vit_small_convnn_branch', branch_ratio=0.25, img_size=32, patch_size=8)
    assert all(type(b.attn) is ConvNNBranchAttention and b.attn.convnn_head_channels == 16 for b in model.blocks)
    # registers / no class token change the prefix-token count the candidate sampler keeps
    model = timm.create_model('vit_tiny_convnn_random', img_size=32, patch_size=4, reg_tokens=2,
                              class_token=False, global_pool='avg')
    assert model.blocks[0].attn.num_prefix_tokens == 2


def _readme_vit_modes():
    """The README's ViT table (Models section): mode -> (candidates, K, r or None), candidates in the layer's terms."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    words = {'all tokens': 'all', 'random': 'random', 'regular grid': 'spatial', 'half of each head': 'all'}
    modes = {}
    for line in readme.split('## Models')[1].splitlines():
        if line.startswith('| `vit_{tiny,small,base}_convnn_'):
            name, text, k, r = [c.strip() for c in line.strip('|').split('|')]
            candidates = [v for w, v in words.items() if text.startswith(w)]
            assert len(candidates) == 1, line
            modes[name.strip('`').split('_convnn_')[1]] = (candidates[0], int(k), None if r == '-' else int(r))
    return modes


@pytest.mark.parametrize('name', VIT_NAMES)
def test_variants_are_the_readme_table(name):
    # each registered name builds what the README's table says: candidates, K and r in every block's layer, the
    # branch variants half ConvNN (lambda 0.5); the sizes are timm's ViT-Ti/S/B patch 16
    modes = _readme_vit_modes()
    assert sorted(modes) == sorted(MODES)
    candidates, k, r = modes[name.split('_convnn_')[1]]
    model = timm.create_model(name, device='meta')
    ref = timm.create_model(f"vit_{name.split('_')[1]}_patch16_224", device='meta')
    assert len(model.blocks) == len(ref.blocks) and model.embed_dim == ref.embed_dim
    assert model.patch_embed.patch_size == ref.patch_embed.patch_size
    for blk, ref_blk in zip(model.blocks, ref.blocks):
        attn = blk.attn
        assert (attn.candidates, attn.num_neighbors, attn.num_heads) == (candidates, k, ref_blk.attn.num_heads)
        if r is not None:
            assert attn.num_samples == r
        branch = name.endswith('_branch')
        assert type(attn) is (ConvNNBranchAttention if branch else ConvNNAttention)
        if branch:
            assert attn.branch_ratio == 0.5


@pytest.mark.parametrize('name', VIT_NAMES)
def test_data_config(name):
    cfg = timm.data.resolve_data_config({}, model=timm.create_model(name, device='meta'))
    assert cfg['input_size'] == (3, 224, 224)
    assert cfg['mean'] == (0.5, 0.5, 0.5) and cfg['std'] == (0.5, 0.5, 0.5)
    assert cfg['interpolation'] == 'bicubic' and cfg['crop_pct'] == 0.9


def test_random_model_is_deterministic_in_eval_and_layers_sample_differently():
    model = timm.create_model('vit_tiny_convnn_random', img_size=64, patch_size=8).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model(x)
        torch.rand(10)
        assert torch.equal(a, model(x))
    cands = {tuple(b.attn._candidate_ids(65, torch.device('cpu')).tolist()) for b in model.blocks}
    assert len(cands) == len(model.blocks)


def test_bad_kwargs():
    with pytest.raises(TypeError):
        timm.create_model('vit_tiny_convnn_all', not_a_model_arg=1)
    with pytest.raises(TypeError, match='attn_layer= cannot be passed'):
        timm.create_model('vit_tiny_convnn_all', attn_layer=nn.Identity)
    with pytest.raises(ValueError, match='num_neighbors'):
        timm.create_model('vit_tiny_convnn_all', num_neighbors=0)
    with pytest.raises(ValueError, match=r'r=8 < K=9'):
        timm.create_model('vit_tiny_convnn_random', num_samples=8)
    with pytest.raises(ValueError, match='branch_ratio'):
        timm.create_model('vit_tiny_convnn_branch', branch_ratio=1.5)
    with pytest.raises(ValueError, match='candidates'):
        timm.create_model('vit_tiny_convnn_all', candidates='knn')


def test_parameter_count_vs_timm_vit_base():
    ours = sum(p.numel() for p in timm.create_model('vit_base_convnn_all_k16', device='meta').parameters())
    ref = sum(p.numel() for p in timm.create_model('vit_base_patch16_224', device='meta').parameters())
    # one depthwise weight per channel and neighbour slot in each of the 12 blocks
    assert ours - ref == 12 * 768 * 16
    assert (ref, ours) == (86_567_656, 86_715_112)


def test_features_only_and_intermediates():
    model = timm.create_model('vit_tiny_convnn_random', features_only=True, img_size=64, patch_size=8)
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape for f in feats] == [torch.Size([1, 192, 8, 8])] * 3
    model = timm.create_model('vit_tiny_convnn_all', img_size=64, patch_size=8).eval()
    x = torch.randn(1, 3, 64, 64)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 12
    torch.testing.assert_close(final, model.forward_features(x))


def test_readme_model_stats_are_current():
    # the README's parameter / GFLOP table is what benchmarks/model_stats.py computes now
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location('model_stats', root / 'benchmarks' / 'model_stats.py')
    stats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stats)
    readme = (root / 'README.md').read_text()
    block = readme.split('<!-- model-stats:begin -->')[1].split('<!-- model-stats:end -->')[0]
    for name in ('vit_base_patch16_224', 'vit_base_convnn_all_k16'):
        row = stats.markdown_row(stats.model_stats(name))
        assert row in block, (row, block)


def test_timm_vit_with_convnn_attn_layer_and_the_token_layout():
    # timm's own VisionTransformer with attn_layer=ConvNNAttention (the README's example): 'all' candidates need no
    # layout; spatial candidates do, and the layer cannot tell that 65 tokens are a class token and 8 x 8 patches: a
    # warning says so and what to pass; given num_prefix_tokens and grid_size (through with_options: timm's
    # VisionTransformer takes the layer as a class) it computes what our ViT computes
    import warnings
    from timm_convnn.layers import ConvNNAttention
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    vit_args = dict(img_size=32, patch_size=4, embed_dim=192, depth=1, num_heads=3, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        timm.models.VisionTransformer(**vit_args, attn_layer=ConvNNAttention).eval()(x)
    ours = timm.create_model('vit_tiny_convnn_spatial', **vit_args, num_samples=16).eval()
    assert all(bool((p == 1).all()) for n, p in ours.named_parameters() if 'aggregate' in n)  # timm's Block: ones
    unknown = timm.models.VisionTransformer(
        **vit_args, attn_layer=ConvNNAttention.with_options(candidates='spatial', num_samples=16)).eval()
    told = timm.models.VisionTransformer(
        **vit_args, attn_layer=ConvNNAttention.with_options(
            candidates='spatial', num_samples=16, num_prefix_tokens=1, grid_size=(8, 8))).eval()
    for model in (unknown, told):
        model.load_state_dict(ours.state_dict())
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r'cannot tell the patch grid of 65 tokens.*grid_size=\(rows, cols\)'):
            assert not torch.allclose(unknown(x), ours(x))
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            assert torch.equal(told(x), ours(x))


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')  # timm's tests still script
@pytest.mark.parametrize('name, kwargs', [('vit_tiny_convnn_spatial', {}),
                                          ('vit_tiny_convnn_all', dict(coords='append', similarity='cosine'))])
def test_dynamic_img_size_layers_see_the_real_patch_grid(name, kwargs):
    # spatial candidates and coordinate channels need the 2-D patch layout; under dynamic_img_size the token count
    # does not determine it (144 patches: 12 x 12, or 9 x 16 from a 144 x 256 image), so the patch embedding records
    # it for the layers. Each layer must then compute what it computes when built for that grid.
    import copy
    import warnings
    torch.manual_seed(0)
    model = timm.create_model(name, dynamic_img_size=True, depth=2, num_classes=3, **kwargs).eval()
    seen = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
             for i, blk in enumerate(model.blocks)]
    for hw, grid in (((144, 256), (9, 16)), ((256, 144), (16, 9)), ((96, 96), (6, 6))):
        with torch.no_grad():
            model(torch.randn(2, 3, *hw))
            for i, blk in enumerate(model.blocks):
                assert blk.attn.token_grid.hw == grid
                built = copy.deepcopy(blk.attn)
                built.token_grid, built.grid_size = None, grid
                assert torch.equal(blk.attn(seen[i]), built(seen[i])), (hw, i)
                if grid == (9, 16):  # what a layer without the record assumes (a 12 x 12 map) differs
                    built.grid_size = None
                    assert not torch.allclose(blk.attn(seen[i]), built(seen[i]))
    for h in hooks:
        h.remove()
    # a copy records its own grid; TorchScript runs (the hook records nothing there: a square map is assumed)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(torch.randn(1, 3, 160, 224))
    assert twin.blocks[0].attn.token_grid.hw == (10, 14) and model.blocks[0].attn.token_grid.hw == (6, 6)
    # TorchScript runs no hook: at the size the model was built for it computes what eager does; at another size it
    # cannot tell the grid and says so (a square map is assumed: right for 192 x 192, not for 160 x 256; both have
    # more patches than the spatial model's 128 candidates, so its grid matters)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            torch.testing.assert_close(scripted(x), model(x))
        for hw in ((192, 192), (160, 256)):
            with pytest.warns(UserWarning, match='under TorchScript cannot see the patch grid'):
                assert scripted(torch.randn(1, 3, *hw)).shape == (1, 3)
    # fixed-size models take the grid at build time and record nothing
    fixed = timm.create_model(name, img_size=(144, 256), depth=1, **kwargs)
    assert fixed.blocks[0].attn.grid_size == (9, 16) and fixed.blocks[0].attn.token_grid is None
    # the model class built directly (not through create_model) records the grid the same way
    from functools import partial
    from timm_convnn.models.vit_convnn import ConvNNBlock, VisionTransformerConvNN
    # (prefix tokens and grid are the model's to give: the blocks get neither here)
    block_kwargs = {k: getattr(model.blocks[0].attn, k) for k in ('candidates', 'num_samples', 'coords', 'similarity')}
    direct = VisionTransformerConvNN(embed_dim=192, num_heads=3, depth=2, num_classes=3, dynamic_img_size=True,
                                     block_fn=partial(ConvNNBlock, **block_kwargs)).eval()
    direct.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 144, 256)
    with torch.no_grad():
        assert torch.equal(direct(x), model(x))
    assert direct.blocks[1].attn.token_grid.hw == (9, 16) and direct.blocks[1].attn.num_prefix_tokens == 1
    direct_fixed = VisionTransformerConvNN(img_size=(144, 256), embed_dim=192, num_heads=3, depth=1, reg_tokens=4,
                                           block_fn=partial(ConvNNBlock, **block_kwargs))
    assert direct_fixed.blocks[0].attn.grid_size == (9, 16) and direct_fixed.blocks[0].attn.num_prefix_tokens == 5


def test_dynamic_img_size_models_trace_with_timm_fx_helpers():
    # timm's FX feature extraction on a dynamic-size model: the patch embedding is an FX leaf, so the traced graph
    # calls it and its grid-recording hook on every run (the hook had raised TraceError on FX proxies)
    from timm.models import create_feature_extractor
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_convnn_spatial', img_size=32, patch_size=8, num_samples=16, depth=2,
                              dynamic_img_size=True).eval()
    graph = create_feature_extractor(model, return_nodes=['head'])
    with torch.no_grad():
        for hw in ((32, 64), (64, 32)):  # (each graph run before the model's own: a stale grid would show)
            x = torch.randn(1, 3, *hw)
            out = graph(x)['head']
            assert model.blocks[0].attn.token_grid.hw == (hw[0] // 8, hw[1] // 8)
            assert torch.equal(out, model(x))
    features = timm.create_model('vit_tiny_convnn_all', img_size=32, patch_size=8, depth=3, dynamic_img_size=True,
                                 features_only=True, feature_cls='fx')
    assert [f.shape for f in features(torch.randn(1, 3, 32, 64))] == [(1, 33, 192)] * 3
    # fixed-size models keep timm's PatchEmbed (traced through, as in timm's own ViT)
    assert type(timm.create_model('vit_tiny_convnn_all', img_size=32, patch_size=8).patch_embed).__name__ == \
        'PatchEmbed'


@pytest.mark.parametrize('name, kwargs', [('vit_tiny_convnn_spatial', {}),
                                          ('vit_tiny_convnn_all', dict(coords='append', similarity='cosine'))])
def test_set_input_size_moves_the_layers_to_the_new_patch_grid(name, kwargs):
    # timm's VisionTransformer.set_input_size resizes the patch grid and the position embedding of a fixed-size model;
    # its ConvNN layers must follow: afterwards the model equals one built for that size with the same weights.
    torch.manual_seed(0)
    resized = timm.create_model(name, depth=2, num_classes=3, **kwargs).eval()
    resized.set_input_size(img_size=(160, 224))
    assert [blk.attn.grid_size for blk in resized.blocks] == [(10, 14)] * 2
    built = timm.create_model(name, img_size=(160, 224), depth=2, num_classes=3, **kwargs).eval()
    built.load_state_dict(resized.state_dict())
    x = torch.randn(2, 3, 160, 224)
    with torch.no_grad():
        assert torch.equal(resized(x), built(x))
        for blk in built.blocks:  # what the layers computed with the grid they were built with (14 x 14) differs
            blk.attn.grid_size = (14, 14)
        with pytest.warns(UserWarning, match='cannot tell the patch grid of 140 tokens'):  # (140 patches, not 14 x 14)
            assert not torch.allclose(resized(x), built(x))
    # a new patch size too (the grid of a 160 x 224 image with 8 px patches)
    resized.set_input_size(patch_size=8)
    assert resized.blocks[0].attn.grid_size == (20, 28)
    assert resized(torch.randn(1, 3, 160, 224)).shape == (1, 3)


def _hooked_forward_backward(model, x, layer_type, checkpointing):
    """Loss gradients of ``model`` on x, and how many times its ``layer_type`` layers ran (training mode, the same RNG
    state each call: random candidates draw the same ids)."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules() if isinstance(m, layer_type)]
    model.set_grad_checkpointing(checkpointing)
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(x).logsumexp(-1).mean(), params)
    for h in hooks:
        h.remove()
    return grads, len(calls)


@pytest.mark.parametrize('name', ['vit_tiny_convnn_random', 'vit_tiny_convnn_branch'])
def test_grad_checkpointing_recomputes_the_same_neighbours(name):
    # timm's set_grad_checkpointing (train.py --grad-checkpointing): each block runs again in the backward; the
    # recompute must draw the same random candidates (checkpoint restores the RNG state), or the gradients change
    model = timm.create_model(name, img_size=64, patch_size=8, num_classes=10).train()
    x = torch.randn(2, 3, 64, 64)
    layer = (ConvNNAttention, ConvNNBranchAttention)
    plain, plain_calls = _hooked_forward_backward(model, x, layer, False)
    ckpt, ckpt_calls = _hooked_forward_backward(model, x, layer, True)
    assert plain_calls == len(model.blocks) and ckpt_calls == 2 * len(model.blocks)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
