""" Hugging Face Hub export, model cards and push for ConvNN models.

``save(model, dir)`` writes what ``timm.create_model('hf-hub:org/repo', pretrained=True)`` reads: ``model.safetensors``,
``config.json`` (architecture, num_classes, pretrained_cfg and ``model_args`` including every ConvNN option, so a
non-default model round-trips; transformers' ``TimmWrapper`` reads the same folder) and a ``README.md`` model card
rendered from ``model_cards/``.
``export_checkpoint`` converts a timm ``train.py`` checkpoint (``model_best.pth.tar`` etc., EMA or not) to that
format; ``push`` uploads the folder with huggingface_hub (token from the usual HF env / cache).
"""
import argparse
import csv
import datetime
import json
import pickle
import shutil
import struct
import string
import sys
import tempfile
import warnings
from importlib import resources
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import timm
from timm.data import resolve_data_config, resolve_input_data_config
from timm.models import save_for_hf

from .layers import ConvNN2d, ConvNNAttention, ConvNNBranch2d, ConvNNBranchAttention
from .models._pretrained import WARM_START_PREFIX
from .version import __version__

__all__ = ['convnn_model_args', 'save', 'render_model_card', 'read_train_summary', 'load_train_checkpoint',
           'export_checkpoint', 'push', 'register_pretrained', 'weights_table']

CITATION = """@article{kang2025convnn,
  title   = {Attention Via Convolutional Nearest Neighbors},
  author  = {Kang, Mingi and Farias, Jeov{\\'a}},
  journal = {arXiv preprint arXiv:2511.14137},
  year    = {2025}
}"""

_OPTIONS = ('num_neighbors', 'candidates', 'num_samples', 'similarity', 'weighting', 'aggregation', 'coords',
            'coord_scale', 'neighbor_order')


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, 'module', model)


def convnn_model_args(model: nn.Module) -> Dict[str, Any]:
    """The ConvNN options of ``model`` as ``create_model`` kwargs (read from its layers, JSON-serialisable)."""
    model = _unwrap(model)
    layers = [m for m in model.modules() if isinstance(m, (ConvNNAttention, ConvNN2d))]
    if not layers:
        return {}
    first = layers[0]
    args = {k: getattr(first, k) for k in _OPTIONS}
    branch = [m for m in model.modules() if isinstance(m, (ConvNNBranchAttention, ConvNNBranch2d))]
    if branch:
        args['branch_ratio'] = branch[0].branch_ratio
    return args


def _family(architecture: str) -> str:
    return 'vit' if architecture.startswith('vit_') else 'cnn'


def read_train_summary(path: Union[str, Path]) -> Dict[str, Any]:
    """Metrics from timm train.py's ``summary.csv``: best and last epoch (top-1 / top-5 / loss)."""
    with open(path, newline='') as f:
        # a resumed train.py run appends a second header row: skip repeated headers
        rows = [r for r in csv.DictReader(f) if r.get('epoch') != 'epoch']
    if not rows:
        raise ValueError(f'{path}: no epochs in train.py summary')
    if 'eval_top1' not in rows[0]:
        raise ValueError(f'{path}: not a timm train.py summary.csv (no eval_top1 column)')

    def number(row: Dict[str, str], column: str, kind=float):
        try:
            return kind(row[column])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f'{path}: column {column} of the row of epoch {row.get("epoch")!r} is not a number: '
                             f'{row.get(column)!r}') from None

    best = max(rows, key=lambda r: number(r, 'eval_top1'))
    last = rows[-1]
    return dict(
        epochs=len(rows),
        best_epoch=number(best, 'epoch', int), best_top1=number(best, 'eval_top1'),
        best_top5=number(best, 'eval_top5'), last_top1=number(last, 'eval_top1'), last_top5=number(last, 'eval_top5'),
        last_eval_loss=number(last, 'eval_loss'),
    )


def _export_notes(metrics: Optional[Dict[str, Any]], dataset: str) -> str:
    if metrics:
        return (f'Weights trained with timm train.py{" on " + dataset if dataset else ""}; metrics are from its '
                f'summary.csv (evaluation split of that run).')
    return 'Accuracy of these weights: not measured.'


def render_model_card(
        model: nn.Module,
        repo_id: str = '',
        metrics: Optional[Dict[str, Any]] = None,
        train_args: Optional[Dict[str, Any]] = None,
        dataset: str = '',
        pretrained_cfg: Optional[Dict[str, Any]] = None,
) -> str:
    """The model card (README.md) for ``model`` from the family template in ``model_cards/``.

    Metrics come from ``metrics`` (train.py's summary, see ``read_train_summary``) or are stated as not measured.
    Input size, mean, std and tag come from ``pretrained_cfg``, the one ``config.json`` holds (``save`` passes it);
    without it, from the model's data config as timm resolves it for an export (the model's own image size, e.g. 32 px
    for a model built with ``img_size=32``, not its default cfg's 224), and no tag: the card describes the weights the
    model holds now.
    """
    model = _unwrap(model)
    if pretrained_cfg is None:
        pretrained_cfg = dict(resolve_input_data_config(model), tag=None)
    cfg = dict(model.pretrained_cfg, **pretrained_cfg)
    arch = cfg['architecture']
    family = _family(arch)
    template = string.Template(resources.files('timm_convnn.model_cards').joinpath(f'{family}.md').read_text())
    opts = convnn_model_args(model)
    n_params = sum(p.numel() for p in model.parameters())
    input_size = tuple(cfg.get('input_size', (3, 224, 224)))
    options = '\n'.join(f'| `{k}` | `{v!r}` |' for k, v in opts.items())
    if metrics:
        metric_text = '\n'.join([
            '| metric | value |', '|---|---|',
            f'| epochs | {metrics["epochs"]} |',
            f'| best top-1 (epoch {metrics["best_epoch"]}) | {metrics["best_top1"]:.2f} |',
            f'| best top-5 | {metrics["best_top5"]:.2f} |',
            f'| last-epoch top-1 | {metrics["last_top1"]:.2f} |',
            f'| last-epoch eval loss | {metrics["last_eval_loss"]:.4f} |',
        ])
    else:
        metric_text = 'Not measured: no training summary was given when this card was written.'
    if train_args:
        keys = ('model', 'data_dir', 'dataset', 'epochs', 'batch_size', 'opt', 'lr', 'weight_decay', 'sched',
                'warmup_epochs', 'clip_grad', 'smoothing', 'mixup', 'cutmix', 'aa', 'drop_path', 'model_ema',
                'amp', 'img_size', 'input_size', 'num_classes', 'seed')
        recipe = '\n'.join(f'| `{k}` | `{train_args[k]!r}` |' for k in keys if train_args.get(k) not in (None, ''))
        recipe = '| train.py argument | value |\n|---|---|\n' + recipe
    else:
        recipe = 'Not recorded (weights exported without a train.py checkpoint).'
    name = repo_id or arch
    fields = dict(
        repo_id=name, architecture=f'`{arch}`' + (f" (tag `{cfg['tag']}`)" if cfg.get('tag') else ''), family=family,
        license=cfg.get('license') or 'apache-2.0', dataset=dataset or 'unspecified',
        num_classes=model.num_classes, params_m=f'{n_params / 1e6:.2f}',
        input_size=f'{input_size[1]} x {input_size[2]}', mean=tuple(cfg.get('mean', ())), std=tuple(cfg.get('std', ())),
        options=options or '| (none) | |', metrics=metric_text, recipe=recipe, notes=_export_notes(metrics, dataset),
        citation=CITATION, version=__version__, date=datetime.date.today().isoformat(),
        # (no repo id: the folder itself; the bare architecture name would load its default tag's weights)
        hub_name=f'hf-hub:{repo_id}' if repo_id else 'local-dir:path/to/this/folder',
        transformers_model=repo_id or 'path/to/this/folder',
    )
    return template.substitute(fields)


def save(
        model: nn.Module,
        save_directory: Union[str, Path],
        repo_id: str = '',
        model_args: Optional[Dict[str, Any]] = None,
        metrics: Optional[Dict[str, Any]] = None,
        train_args: Optional[Dict[str, Any]] = None,
        dataset: str = '',
        model_card: bool = True,
        data_config: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and (``model_card``) ``README.md`` to ``save_directory``.
    ``data_config``: the preprocessing the weights were trained / evaluated with (input size, mean, std, crop, ...;
    timm's ``save_for_hf``), which ``config.json`` then records instead of the architecture's defaults."""
    model = _unwrap(model)
    if not any(isinstance(m, (ConvNNAttention, ConvNN2d, ConvNNBranchAttention, ConvNNBranch2d))
               for m in model.modules()):
        raise ValueError(f'hub.save writes ConvNN models (a ConvNN model card and options); {type(model).__name__} '
                         f'has no ConvNN layer: save timm\'s own models with timm.models.save_for_hf')
    save_directory = Path(save_directory)
    args = convnn_model_args(model)
    args.update(model_args or {})
    # the exported weights are whatever the model holds now: drop the source tag's notes (e.g. "warm start")
    model_config = {'pretrained_cfg': {'tag': None, 'notes': _export_notes(metrics, dataset)}}
    save_for_hf(model, save_directory, model_config=model_config, model_args=args, safe_serialization=True,
                data_config=data_config)
    _drop_num_classes_from_model_args(save_directory / 'config.json')
    if model_card:
        written = json.loads((save_directory / 'config.json').read_text(encoding='utf-8'))['pretrained_cfg']
        text = render_model_card(model, repo_id, metrics=metrics, train_args=train_args, dataset=dataset,
                                 pretrained_cfg=written)
        (save_directory / 'README.md').write_text(text, encoding='utf-8')
    return save_directory


def _drop_num_classes_from_model_args(config_path: Path) -> None:
    """Keep the class count only where timm and transformers both read it, the top-level ``num_classes``.

    timm's ``save_for_hf`` also copies it into ``model_args``. transformers' ``TimmWrapper``
    (``AutoModelForImageClassification.from_pretrained`` on a timm repo) passes ``num_classes`` to
    ``timm.create_model`` itself, next to ``**model_args``, and fails with "got multiple values for keyword argument
    'num_classes'". timm builds the head from the top-level value either way (it becomes the pretrained cfg's
    ``num_classes``, the model's default).
    """
    config = json.loads(config_path.read_text(encoding='utf-8'))
    model_args = config.get('model_args') or {}
    if 'num_classes' in model_args and model_args['num_classes'] == config.get('num_classes'):
        del model_args['num_classes']
        config_path.write_text(json.dumps(config, indent=2), encoding='utf-8')


def state_dict_mismatch(e: RuntimeError) -> str:
    """torch's load_state_dict error in one line: its first problem and how many more (the full message lists every
    missing, unexpected and mis-sized tensor, one per line)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) < 2:
        return ' '.join(lines)
    more = f' (and {len(lines) - 2} more)' if len(lines) > 2 else ''
    return f'{lines[0]} {lines[1]}{more}'


def require_checkpoint_file(path: Union[str, Path]) -> None:
    """FileNotFoundError naming ``path`` when no file is there (timm's checkpoint loader raises one without a
    message)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f'no checkpoint file at {path}')


def is_unreadable_checkpoint(e: BaseException) -> bool:
    """Whether ``e`` (from ``torch.load``, or timm's loading around it) says the file itself could not be read, as
    opposed to e.g. a state dict that does not fit the model."""
    if isinstance(e, (pickle.UnpicklingError, EOFError, struct.error)):  # (struct: a truncated legacy-format file)
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        words in text for words in ('weights_only', 'PytorchStreamReader', 'unexpected EOF'))


def unreadable_checkpoint(path: Union[str, Path], e: BaseException) -> ValueError:
    """One line for a checkpoint file that torch.load could not read (``unreadable_reason``)."""
    return ValueError(f'{path} is not a readable torch checkpoint (truncated or corrupt, or it holds objects other '
                      f'than tensors and train.py arguments): {unreadable_reason(e)}')


def unreadable_reason(e: BaseException) -> str:
    """Why torch.load could not read a file, in one line. torch's weights-only message leads with advice (retry with
    weights_only=False) that is wrong for a damaged file; the unpickler's own reason ends it (timm raises its own
    message with torch's as the cause)."""
    for err in (e, e.__cause__):
        if err is not None and 'WeightsUnpickler error:' in str(err):
            reason = str(err).split('WeightsUnpickler error:')[-1].strip()
            break
    else:
        # (what else torch.load raises on bytes that are not its format names no file: KeyError: 174812789)
        reason = f'{type(e).__name__}: {str(e).strip()}' if str(e).strip() else ''
    return reason.splitlines()[0] if reason else type(e).__name__


def load_train_checkpoint(path: Union[str, Path], use_ema: bool = False) -> Tuple[str, Dict[str, torch.Tensor], Dict]:
    """(architecture, state_dict, train.py args) from a timm train.py checkpoint.

    ``use_ema`` picks ``state_dict_ema`` (saved when training with ``--model-ema``) and fails clearly if absent.
    """
    path = Path(path)
    require_checkpoint_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # (the weights-only unpickler lets KeyError, IndexError, ... escape on junk bytes)
        raise unreadable_checkpoint(path, e) from e
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise ValueError(f'{path} is not a timm train.py checkpoint (no state_dict entry)')
    key = 'state_dict_ema' if use_ema else 'state_dict'
    if key not in ckpt:
        raise ValueError(f'{path} has no {key} (it was not trained with --model-ema); export without --ema')
    args = ckpt.get('args')
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    arch = ckpt.get('arch') or args.get('model')
    if not arch:
        raise ValueError(f'{path} records no architecture (arch); pass the model name')
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in ckpt[key].items()}
    return arch, state_dict, args


def export_checkpoint(
        checkpoint: Union[str, Path],
        save_directory: Union[str, Path],
        repo_id: str = '',
        use_ema: bool = False,
        model_name: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        summary: Optional[Union[str, Path]] = None,
        dataset: str = '',
) -> Path:
    """Convert a timm train.py checkpoint to Hub format (``save``), with train.py's recipe and metrics in the card.

    The model is rebuilt as train.py built it (``train_model_kwargs``; ``model_kwargs`` override), the weights load
    strictly, ``config.json`` records the preprocessing train.py validated with (input size, mean, std, crop;
    timm's ``resolve_data_config`` of the run's arguments), and ``summary.csv`` next to the checkpoint is used for
    metrics when ``summary`` is not given.
    """
    from .catalog import check_model_name  # (catalog imports this module)
    arch, state_dict, args = load_train_checkpoint(checkpoint, use_ema=use_ema)
    arch = check_model_name(model_name or arch)  # (an unknown name: a ValueError with the close ones)
    if summary and not Path(summary).is_file():
        raise FileNotFoundError(f'no summary file at {summary}')
    kwargs = train_model_kwargs(args)
    kwargs.update(model_kwargs or {})
    try:
        model = timm.create_model(arch, **kwargs)
    except TypeError as e:  # a model kwarg (recorded by train.py, or given) that the architecture does not take
        raise ValueError(f'cannot build {arch} with {kwargs}: {e}') from e
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # (a ValueError: the arguments, architecture or kwargs, do not fit the file)
        raise ValueError(f'{checkpoint}: weights do not fit {arch} built with {kwargs}: '
                         f'{state_dict_mismatch(e)}') from e
    try:
        data_config = resolve_data_config(args, model=model)
    except ValueError as e:  # (timm: a size or channel count the rebuilt model cannot take)
        raise ValueError(f'{checkpoint}: the input settings of the run do not fit {arch} built with {kwargs}: '
                         f'{e}') from e
    summary = Path(summary) if summary else Path(checkpoint).with_name('summary.csv')
    metrics = read_train_summary(summary) if summary.exists() else None
    return save(model, save_directory, repo_id=repo_id, metrics=metrics, train_args=args, dataset=dataset,
                data_config=data_config)


def train_model_kwargs(args: Dict[str, Any]) -> Dict[str, Any]:
    """The ``timm.create_model`` keyword arguments with which timm's train.py built the model of a run, from the
    run's arguments (``args``, as its checkpoints record them): ``--model-kwargs`` and the options train.py turns
    into model arguments, ``--in-chans`` (else the channels of ``--input-size``), ``--num-classes``, ``--gp``,
    ``--bn-momentum``, ``--bn-eps``; unset ones (None) are left out, as ``create_model`` leaves them. train.py passes
    no image size: a size reaches the model only through ``--model-kwargs img_size=...``. (Drop rates change no
    weights, and an exported model does not keep them.)"""
    input_size = args.get('input_size')
    kwargs = dict(
        in_chans=args.get('in_chans') or (input_size[0] if input_size else None),
        num_classes=args.get('num_classes'),
        global_pool=args.get('gp'),
        bn_momentum=args.get('bn_momentum'),
        bn_eps=args.get('bn_eps'),
    )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    extra = args.get('model_kwargs') or {}
    if not isinstance(extra, dict):
        raise ValueError(f"the run's model_kwargs must be a dict of create_model arguments (train.py's --model-kwargs);"
                         f' got {type(extra).__name__} {extra!r}')
    kwargs.update(extra)
    return kwargs


def _hf_upload(folder: Path, repo_id: str, token: Optional[str], private: bool, commit_message: str) -> str:
    from huggingface_hub import HfApi
    api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(info, 'commit_url', info))


def push(
        checkpoint: Union[str, Path],
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        dry_run: bool = False,
        out_dir: Optional[Union[str, Path]] = None,
        commit_message: str = 'Add ConvNN model (timm-convnn)',
        uploader: Optional[Callable[..., str]] = None,
        **export_kwargs: Any,
) -> Tuple[Path, Optional[str]]:
    """Export ``checkpoint`` (train.py checkpoint, or an already exported folder) and upload it to ``repo_id``.

    The export goes to ``out_dir``, or else to a new temporary folder that is removed after the upload (and after a
    failure); ``dry_run`` writes the folder and uploads nothing (a temporary folder then stays, to be looked at).
    Returns (folder, upload result or None).
    """
    if '/' not in repo_id:
        raise ValueError(f'repo_id must be "org/name", got {repo_id!r}')
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        missing = [f for f in ('model.safetensors', 'config.json') if not (checkpoint / f).exists()]
        if missing:
            raise FileNotFoundError(f'{checkpoint} is not an exported model folder: missing {", ".join(missing)}')
        ignored = [k for k, v in dict(export_kwargs, out_dir=out_dir).items() if v]  # (all default to falsy)
        if ignored:
            raise ValueError(f'{checkpoint} is an exported folder, uploaded as it is: {", ".join(ignored)} '
                             f'apply to a train.py checkpoint only')
        folder, temporary = checkpoint, False
    else:
        temporary = not out_dir
        folder = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix='timm-convnn-push-'))
    kept = False  # (a dry run's temporary folder, once written)
    try:
        if folder is not checkpoint:
            export_checkpoint(checkpoint, folder, repo_id=repo_id, **export_kwargs)
        if dry_run:
            kept = True
            return folder, None
        upload = uploader or _hf_upload
        return folder, upload(folder, repo_id, token, private, commit_message)
    finally:
        if temporary and not kept:
            shutil.rmtree(folder, ignore_errors=True)


def register_pretrained(name: str, hf_hub_id: str, default: bool = False, **cfg: Any) -> None:
    """Register a pretrained tag ``arch.tag`` for ConvNN weights published on the Hub (e.g. with ``push``).

    The tag gets the architecture's pretrained cfg with ``hf_hub_id`` and any ``cfg`` fields replaced, so that
    ``timm.create_model('arch.tag', pretrained=True)`` (and ``default=True``: ``pretrained=True`` on ``arch``) loads
    it like any timm weights. Permanent tags belong in the model file's ``default_cfgs``; this is for weights
    published after a release.
    """
    arch, _, tag = name.partition('.')
    if 'convnn' not in arch or not timm.is_model(arch):
        raise ValueError(f'{arch!r} is not a registered ConvNN architecture')
    if not tag:
        raise ValueError(f'name must be "arch.tag", got {name!r}')
    # timm's public route: the tag joins the model file's default_cfgs, and registering the entrypoint again
    # (timm.models.register_model overwrites a registration, its tags and pretrained cfgs) publishes it
    entrypoint = timm.models.model_entrypoint(arch)
    arch_cfgs = sys.modules[entrypoint.__module__].default_cfgs[arch]
    base = arch_cfgs.cfgs[arch_cfgs.tags[0]]
    arch_cfgs.cfgs[tag] = replace(
        base, hf_hub_id=hf_hub_id, url='', file=None, state_dict=None, hf_hub_filename=None, custom_load=False,
        tag=tag, notes=cfg.pop('notes', ''), **cfg)
    if tag not in arch_cfgs.tags:
        arch_cfgs.tags.append(tag)
    if default:
        arch_cfgs.tags.remove(tag)
        arch_cfgs.tags.appendleft(tag)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=f'Overwriting {arch} in registry')
        timm.models.register_model(entrypoint)


def weights_table() -> str:
    """Markdown table of every pretrained tag of the registered ConvNN models (kept in the README by a test)."""
    lines = ['| model.tag | weights | trained as ConvNN | top-1 |', '|---|---|---|---|']
    for name in timm.list_pretrained('*convnn*'):
        cfg = timm.models.get_pretrained_cfg(name)
        source = cfg.hf_hub_id or cfg.url or cfg.file
        warm = (cfg.tag or '').startswith(WARM_START_PREFIX)
        trained = 'no: warm start (ConvNN layers new)' if warm else 'yes'
        top1 = 'not measured' if warm else (cfg.notes or 'see model card')
        lines.append(f'| `{name}` | `{source}` | {trained} | {top1} |')
    return '\n'.join(lines)
