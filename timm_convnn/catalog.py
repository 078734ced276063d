""" The ConvNN models in timm's registry: names, sizes, ConvNN settings and pretrained tags (``timm-convnn list`` /
``info``). Models are built on the meta device: no weights are allocated or downloaded.
"""
import difflib
import fnmatch
import json
from typing import Any, Dict, List

import timm

from . import models  # noqa: F401  (registers the models)
from .hub import convnn_model_args
from .inspect import convnn_layers
from .utils import count_flops, count_params

__all__ = ['check_model_name', 'convnn_model_names', 'model_summary', 'model_table', 'model_info']


def convnn_model_names(pattern: str = '') -> List[str]:
    """Registered convnn model names matching ``pattern`` (fnmatch; a plain word matches as a substring)."""
    names = timm.list_models('*convnn*')
    if not pattern:
        return names
    if not any(ch in pattern for ch in '*?['):
        pattern = f'*{pattern}*'
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def check_model_name(name: str) -> str:
    """``name`` if timm can build it (a registered name, optionally ``.tag``, or an ``hf-hub:`` id), else a ValueError
    that suggests the closest registered names, or for an unknown tag names the architecture's tags (timm's
    RuntimeError names none)."""
    if name.startswith(('hf-hub:', 'local-dir:')):
        return name
    arch, tag = timm.models.split_model_name_tag(name)
    if timm.is_model(arch):
        tags = [full.split('.', 1)[1] for full in timm.models.get_arch_pretrained_cfgs(arch)]
        if tag and tag not in tags:
            valid = f'its tags: {", ".join(tags)}' if tags else 'it has none'
            raise ValueError(f'unknown pretrained tag {tag!r} for {arch}; {valid} (or no tag: {arch})')
        return name
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f'; did you mean: {", ".join(close)}?' if close else '; `timm-convnn list` shows the ConvNN models'
    raise ValueError(f'unknown model {name!r}{hint}')


def model_summary(name: str, flops: bool = True) -> Dict[str, Any]:
    """Params, GFLOPs at the default input size, ConvNN settings and pretrained tags of a registered model."""
    model = timm.create_model(check_model_name(name), device='meta')
    layers = list(convnn_layers(model).values())
    if not layers:
        raise ValueError(f'{name} has no ConvNN layer')
    input_size = tuple(model.pretrained_cfg.get('input_size', (3, 224, 224)))
    args = convnn_model_args(model)
    return dict(
        model=name,
        params_m=count_params(model) / 1e6,
        gflops=count_flops(model, input_size) / 1e9 if flops else None,
        input_size=input_size,
        mixer=type(layers[0]).__name__,
        num_layers=len(layers),
        candidates=args['candidates'],
        num_neighbors=args['num_neighbors'],
        num_samples=args['num_samples'] if args['candidates'] != 'all' else None,
        similarity=args['similarity'],
        branch_ratio=args.get('branch_ratio'),
        tags=[t.split('.', 1)[1] for t in timm.list_pretrained(f'{timm.models.split_model_name_tag(name)[0]}.*')],
    )


def model_table(pattern: str = '', flops: bool = True) -> str:
    names = convnn_model_names(pattern)
    if not names:
        close = difflib.get_close_matches(pattern, timm.list_models('*convnn*'), n=5, cutoff=0.5)
        hint = f'; did you mean: {", ".join(close)}?' if close else ''
        raise ValueError(f'no ConvNN model matches {pattern!r}{hint}')
    lines = ['| model | params (M) | GFLOPs | mixer | candidates | K | r | similarity | pretrained tags |',
             '|---|---|---|---|---|---|---|---|---|']
    for name in names:
        s = model_summary(name, flops=flops)
        cand = s['candidates'] + (f', branch {s["branch_ratio"]:g}' if s['branch_ratio'] is not None else '')
        gflops = f'{s["gflops"]:.2f}' if s['gflops'] is not None else '-'
        lines.append(f'| {name} | {s["params_m"]:.2f} | {gflops} | {s["mixer"]} | {cand} | {s["num_neighbors"]} | '
                     f'{s["num_samples"] if s["num_samples"] is not None else "-"} | {s["similarity"]} | '
                     f'{", ".join(s["tags"]) or "-"} |')
    return '\n'.join(lines)


def model_info(name: str) -> Dict[str, Any]:
    """Everything about one model: summary, every ConvNN option, its ConvNN layers, feature maps, pretrained cfgs."""
    name = check_model_name(name)
    model = timm.create_model(name, device='meta')
    # (hf-hub: / local-dir: names: the architecture their config names)
    arch = model.pretrained_cfg.get('architecture') or timm.models.split_model_name_tag(name)[0]
    layers = convnn_layers(model)
    layer_reprs: Dict[str, int] = {}
    for m in layers.values():
        key = f'{type(m).__name__}({m.extra_repr()})'
        layer_reprs[key] = layer_reprs.get(key, 0) + 1
    pretrained = {}
    for full in timm.list_pretrained(f'{arch}.*'):
        cfg = timm.models.get_pretrained_cfg(full)
        pretrained[full] = cfg.to_dict() if cfg is not None else None
    info = dict(
        model=name,
        class_name=f'{type(model).__module__}.{type(model).__name__}',
        entrypoint=f'{timm.models.model_entrypoint(arch).__module__}.{arch}',
        params_m=count_params(model) / 1e6,
        num_classes=getattr(model, 'num_classes', None),
        num_features=getattr(model, 'num_features', None),
        convnn_options=convnn_model_args(model),
        convnn_layers=layer_reprs,
        feature_info=[dict(f) for f in getattr(model, 'feature_info', [])],
        default_pretrained_cfg=model.pretrained_cfg,
        pretrained_tags=pretrained,
    )
    return json.loads(json.dumps(info, default=str))
