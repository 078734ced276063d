""" Pretrained weights for ConvNN models: warm-start tags from timm's published weights, and clear loading errors.

A warm-start tag (``<arch>.from_timm_<source tag>``) points at the timm checkpoint of the model ConvNN modifies
(same Hub repo, same preprocessing). Loading goes through the family's ``checkpoint_filter_fn``: every tensor whose
role is unchanged loads, ConvNN's new tensors start from their initialisation. The ConvNN model itself was not
trained: its accuracy is not measured until someone fine-tunes and publishes it under a tag of its own.
"""
import json
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import timm
from timm.models import get_pretrained_cfg, resolve_pretrained_cfg

__all__ = ['warm_start_cfg', 'explain_load_errors', 'PretrainedWeightsError', 'PretrainedWeightsNotFoundError',
           'WARM_START_PREFIX']

WARM_START_PREFIX = 'from_timm_'
_DATA_KEYS = ('input_size', 'test_input_size', 'min_input_size', 'crop_pct', 'test_crop_pct', 'crop_mode',
              'interpolation', 'mean', 'std', 'num_classes', 'license')


class PretrainedWeightsError(RuntimeError):
    """``pretrained=True`` found no weights to load, or could not load them; the message says which and what to do.
    A ``RuntimeError``, as timm raises for an unknown pretrained tag."""


class PretrainedWeightsNotFoundError(PretrainedWeightsError, FileNotFoundError):
    """No weights file where the pretrained cfg points (a local file, or a Hub file not in the cache while offline):
    also a ``FileNotFoundError`` (an ``OSError``), which timm and huggingface_hub raise there, so that code catching
    those keeps working."""


def warm_start_cfg(base_cfg: Dict[str, Any], source: str, new_tensors: str) -> Dict[str, Any]:
    """A pretrained cfg that loads timm's ``source`` weights (``arch.tag``) into a ConvNN model.

    Preprocessing, classes and license are the source's; ``notes`` says what was and was not trained.
    """
    src = get_pretrained_cfg(source)
    if src is None or not src.hf_hub_id:
        raise ValueError(f'{source} is not a timm checkpoint on the Hugging Face Hub')
    cfg = dict(base_cfg)
    cfg.update({k: v for k, v in src.to_dict().items() if k in _DATA_KEYS and v is not None})
    cfg.update(
        url='', hf_hub_id=src.hf_hub_id, custom_load=False,
        notes=(f'Warm start, not ConvNN-trained: weights of timm/{source} (ImageNet-1k classifier) loaded into the '
               f'ConvNN architecture; {new_tensors} are new and start from their initialisation. '
               f'Top-1 of this ConvNN model: not measured.'),
    )
    return cfg


def _source_of(cfg: Dict[str, Any]) -> str:
    for key in ('file', 'hf_hub_id', 'url'):
        if cfg.get(key):
            name = cfg[key]
            if key == 'hf_hub_id':
                name = f'hf-hub repo {name} (file {cfg.get("hf_hub_filename") or "model.safetensors"})'
            return name
    if cfg.get('state_dict') is not None:
        return 'an in-memory state_dict'
    return ''


def _hub_config_architecture(repo_id: str) -> Optional[str]:
    try:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(repo_id.split('@')[0], 'config.json', local_files_only=True)
        with open(path) as f:
            return json.load(f).get('architecture')
    except Exception:  # no config.json cached: nothing to add
        return None


def _cached_files(repo_id: str):
    try:
        from huggingface_hub import constants, scan_cache_dir
        # the cache loading used: scan_cache_dir's default is the value from when its module was first imported
        for repo in scan_cache_dir(constants.HF_HUB_CACHE).repos:
            if repo.repo_id == repo_id.split('@')[0]:
                return sorted({f.file_name for rev in repo.revisions for f in rev.files})
    except Exception:
        pass
    return []


def _unreadable(e: BaseException) -> bool:
    from ..hub import is_unreadable_checkpoint  # (hub imports the models package)
    return is_unreadable_checkpoint(e) or (e.__cause__ is not None and is_unreadable_checkpoint(e.__cause__))


def _is_loading_error(e: Exception) -> bool:
    """An error of finding or reading the weights, even where it is also a ValueError (huggingface_hub < 1.0 derives
    LocalEntryNotFoundError, raised offline for a file not in the cache, from ValueError and FileNotFoundError)."""
    return isinstance(e, OSError) or type(e).__module__.split('.')[0] == 'huggingface_hub'


@contextmanager
def explain_load_errors(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Iterator[None]:
    """Re-raise pretrained-loading failures with the repo / file, the cause and what to do.

    Construction errors (bad options: ``ValueError`` / ``TypeError``) pass through untouched.
    """
    if not pretrained:
        yield
        return
    arch = variant.split('.')[0]
    tags = timm.list_pretrained(f'{arch}.*')
    with_weights = f'Tags with weights: {", ".join(tags) if tags else "none"}; or use pretrained=False.'
    try:
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
    except RuntimeError as e:  # unknown tag
        raise PretrainedWeightsError(f'{e} {with_weights}') from e
    source = _source_of(cfg)
    if not source:
        raise PretrainedWeightsError(f'{arch}.{cfg.get("tag") or ""} has no pretrained weights. {with_weights}')
    try:
        yield
    except Exception as e:
        if isinstance(e, (ValueError, TypeError)) and not _is_loading_error(e):
            raise
        text = f'{type(e).__name__}: {e}'
        hub_id = cfg.get('hf_hub_id')
        if 'size mismatch' in text or 'Missing key' in text or 'Unexpected key' in text:
            why = ('the checkpoint does not match this architecture/configuration (e.g. saved with another '
                   'num_neighbors, num_samples, branch_ratio or size); create the model with the options it was '
                   'saved with, or load it by its hf-hub: name so its config.json sets them')
            other = _hub_config_architecture(hub_id) if hub_id else None
            if other and other != arch:
                why = f'its config.json says it is a {other} checkpoint, not {arch}'
        elif 'deserializ' in text.lower() or 'safetensor' in text.lower() or 'header' in text.lower():
            why = 'the file is truncated or corrupt; delete it from the cache (or re-export it) and download again'
        elif 'offline' in text.lower() or 'LocalEntryNotFound' in text or 'cannot find the requested files' in text:
            cached = _cached_files(hub_id) if hub_id else []
            have = (f' (cached files of this repo: {", ".join(cached)})' if cached
                    else ' (nothing of this repo is cached)')
            why = ('the weights file (model.safetensors or pytorch_model.bin) is not in the local Hugging Face cache'
                   f'{have} and downloads are disabled or impossible (HF_HUB_OFFLINE / no network); run once with '
                   'network access, or point HF_HUB_CACHE at a cache that holds it')
        elif 'EntryNotFound' in text or 'does not exist' in text or 'No such file' in text or '404' in text:
            why = 'the weights file is missing (expected model.safetensors or pytorch_model.bin)'
        elif isinstance(e, FileNotFoundError) and cfg.get('file'):  # (timm raises it without a message)
            why = 'no such file'
        elif _unreadable(e):  # (torch's own words would advise weights_only=False, wrong for a damaged file)
            from ..hub import unreadable_reason
            reason = unreadable_reason(e)
            if 'Unsupported global' in reason:  # (an intact file of pickled objects: torch.save(model), ...)
                why = (f'the file holds pickled objects, not a state dict of tensors (e.g. torch.save(model) rather '
                       f'than torch.save(model.state_dict())): {reason}')
            else:
                why = f'the file is not a readable torch checkpoint (truncated or corrupt): {reason}'
        elif isinstance(e, AttributeError) and "has no attribute 'items'" in text:
            why = 'the file does not hold a state dict (tensors by name) but another object'
        else:
            why = text  # unforeseen: the loader's own words
        error = PretrainedWeightsNotFoundError if isinstance(e, FileNotFoundError) else PretrainedWeightsError
        raise error(f'Could not load pretrained weights for {variant} from {source}: {why}.') from e
