""" ``timm-convnn`` command line. """
import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .models._pretrained import PretrainedWeightsError
from .version import __version__


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck
    return run_selfcheck(quick=args.quick)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    if args.out_dir is not None and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ValueError(f'--out-dir {args.out_dir} is a file, not a folder')  # (found before training, not after)
    run_demo(epochs=args.epochs, quick=args.quick, out_dir=args.out_dir, seed=args.seed,
             progress=False if args.no_progress else None)
    return 0


def _cmd_digits(args: argparse.Namespace) -> int:
    from .data import write_digits_imagefolder
    try:
        root = write_digits_imagefolder(args.out_dir, img_size=args.img_size)
    except OSError as e:  # not a folder, no permission, disk full
        raise ValueError(f'cannot write the digits ImageFolder to {args.out_dir}: {e}') from e
    except ImportError as e:  # scikit-learn, an extra: the message says how to install it
        raise ValueError(str(e)) from e
    counts = {split: sum(1 for _ in (root / split).rglob('*.png')) for split in ('train', 'validation')}
    print(f'wrote scikit-learn digits to {root}: train/ {counts["train"]} and validation/ {counts["validation"]} '
          f'images, 10 classes, {args.img_size} px')
    return 0


def _positive(unit: str) -> Callable[[str], int]:
    """An argparse type: a whole number >= 1 of ``unit``, else argparse's one-line error naming the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a positive whole number, got {text!r}') from None
        if value < 1:
            raise argparse.ArgumentTypeError(f'must be a positive number of {unit}, got {value}')
        return value
    return parse


_pixels, _epochs = _positive('pixels'), _positive('epochs')


def _kv(text: str):
    import ast
    key, sep, value = text.partition('=')
    if not sep:
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _export_kwargs(args: argparse.Namespace) -> dict:
    return dict(use_ema=args.ema, model_name=args.model, model_kwargs=dict(args.model_kwargs or []),
                summary=args.summary, dataset=args.dataset)


def _cmd_export(args: argparse.Namespace) -> int:
    from .hub import export_checkpoint
    out = export_checkpoint(args.checkpoint, args.out_dir, repo_id=args.repo_id or '', **_export_kwargs(args))
    print(f'exported {args.checkpoint} -> {out}: ' + ', '.join(sorted(p.name for p in out.iterdir())))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push
    folder, result = push(args.checkpoint, args.repo_id, private=args.private, dry_run=args.dry_run,
                          out_dir=args.out_dir, **_export_kwargs(args))
    if result is None:
        done = 'checked exported folder' if Path(args.checkpoint).is_dir() else 'wrote'
        print(f'dry run: {done} {folder} ({", ".join(sorted(p.name for p in folder.iterdir()))}); nothing uploaded')
    else:
        print(f'uploaded {folder} to {args.repo_id}: {result}'
              + ('' if args.out_dir or Path(args.checkpoint).is_dir() else ' (temporary folder removed)'))
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    from . import models  # noqa: F401  (registers the models)
    from .hub import weights_table
    print(weights_table())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run
    run(args)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .catalog import model_table
    print(model_table(args.pattern or '', flops=not args.no_flops))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import json
    from .catalog import model_info
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f'{info["model"]}: {info["class_name"]} (entrypoint {info["entrypoint"]}), '
          f'{info["params_m"]:.3f} M params, {info["num_classes"]} classes, {info["num_features"]} features')
    print('\nConvNN options (create_model kwargs):')
    for k, v in info['convnn_options'].items():
        print(f'  {k} = {v!r}')
    print('\nConvNN layers:')
    for layer, count in info['convnn_layers'].items():
        print(f'  {count} x {layer}')
    print('\nfeature maps (features_only):')
    for f in info['feature_info']:
        print(f'  {f.get("module")}: {f.get("num_chs")} channels, reduction {f.get("reduction")}')
    print('\ndefault pretrained cfg:')
    print('  ' + json.dumps(info['default_pretrained_cfg'], indent=2).replace('\n', '\n  '))
    print('\npretrained tags:')
    for tag, cfg in info['pretrained_tags'].items():
        src = (cfg or {}).get('hf_hub_id') or (cfg or {}).get('url') or '-'
        print(f'  {tag}: {src}')
    return 0


def _check_image_out(path: str) -> None:
    """--out names an image file PIL writes, in an existing folder (found before the model runs, not after)."""
    from PIL import Image
    out = Path(path)
    Image.init()
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise ValueError(f'--out {path}: not an image file extension PIL writes: {out.suffix!r} (e.g. .png, .jpg)')
    if not out.parent.is_dir():
        raise ValueError(f'--out {path}: no folder {out.parent}')


def _parse_query(text: str):
    x, sep, y = text.partition(',')
    try:
        return int(x), int(y)
    except ValueError:
        raise ValueError(f'--query must be X,Y in pixels of the model input (e.g. 112,80); got {text!r}') from None


def _create_model(name: str, pretrained: bool, img_size: Optional[int], kwargs: Dict[str, Any]):
    """timm.create_model with ``--img-size`` passed on as ``img_size`` to models built for a fixed input size (ViTs;
    timm resamples the position embedding of pretrained weights) unless ``--model-kwargs`` sets it; a ValueError
    naming the kwargs the model does not take."""
    import timm
    create_args = timm.models.resolve_model_input_args(name, dict(img_size=img_size), **kwargs)
    try:
        return timm.create_model(pretrained=pretrained, **create_args)
    except TypeError as e:  # a kwarg the model does not take, or a value of the wrong type
        given = {k: v for k, v in create_args.items() if k not in ('model_name', 'pretrained_cfg')}
        if not given:
            raise
        text = ' '.join(f'{k}={v!r}' for k, v in given.items())
        raise ValueError(f'cannot create {name} with {text}: {e}') from e


def _load_checkpoint(model, path: str, name: str) -> None:
    """Load ``path`` into ``model`` as create_model(checkpoint_path=...) does (EMA weights first), with one-line errors
    for a file that is no checkpoint and for weights that do not fit."""
    import timm
    from .hub import is_unreadable_checkpoint, state_dict_mismatch, unreadable_checkpoint
    if Path(path).suffix.lower() in ('.npz', '.npy'):  # timm hands these to the model's own loader
        timm.models.load_checkpoint(model, path)
        return
    try:
        state_dict = timm.models.load_state_dict(path)
    except Exception as e:  # reading the file and picking its state dict: whatever fails, the file is the cause
        if is_unreadable_checkpoint(e):
            raise unreadable_checkpoint(path, e) from e
        raise ValueError(f'{path} is not a readable timm checkpoint or state dict (a torch.save file of a dict of '
                         f'tensors, or of a dict with a state_dict / state_dict_ema / model entry): '
                         f'{type(e).__name__}: {e}') from e
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(f'the checkpoint {path} does not fit {name}: {state_dict_mismatch(e)}') from e


def _cmd_neighbors(args: argparse.Namespace) -> int:
    from PIL import Image
    from .catalog import check_model_name
    from .hub import require_checkpoint_file
    from .viz import neighbor_map

    name = check_model_name(args.model)
    if args.pretrained and args.checkpoint:
        raise ValueError('use --pretrained or --checkpoint, not both')
    query = _parse_query(args.query) if args.query else None
    _check_image_out(args.out)
    kwargs = dict(args.model_kwargs or [])
    if args.checkpoint:
        require_checkpoint_file(args.checkpoint)
    image = None
    if args.image:
        try:
            image = Image.open(args.image)
        except OSError as e:  # missing, or not an image PIL reads
            raise ValueError(f'cannot read the image {args.image}: {e}') from e
    model = _create_model(name, args.pretrained, args.img_size, kwargs).eval()
    if args.checkpoint:
        _load_checkpoint(model, args.checkpoint, name)
    (w, h), records, (qx, qy) = neighbor_map(model, args.out, image, query, args.layers, args.img_size)
    shown = len(set(args.layers)) if args.layers else len(records)
    print(f'wrote {args.out} ({w}x{h} px): {shown} ConvNN layers of {name}, query pixel ({qx}, {qy})')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-convnn', description='Convolutional Nearest Neighbors (arXiv 2511.14137) for timm.')
    parser.add_argument('--version', action='version', version=f'timm-convnn {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    p = sub.add_parser('demo', help='train a ConvNN ViT and timm\'s ViT on digits (CPU, minutes), export, reload',
                       description='Train a small ConvNN ViT and the same-size timm ViT on the embedded scikit-learn '
                                   'digits with timm\'s optimizer / scheduler / loss, print what was measured, export '
                                   'the ConvNN model in Hub format and reload it with timm.create_model.')
    p.add_argument('--epochs', type=_epochs, default=15)
    p.add_argument('--quick', action='store_true', help='smaller models and at most 8 epochs (seconds)')
    p.add_argument('--out-dir', default=None, help='where to export the ConvNN model (default: a temporary folder)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--no-progress', action='store_true',
                   help='no progress output (default: a bar on a terminal, one line per epoch when redirected)')
    p.set_defaults(func=_cmd_demo, friendly_errors=True)

    p = sub.add_parser('selfcheck', help='check the attention and convolution identities and time ConvNN vs SDPA')
    p.add_argument('--quick', action='store_true', help='smaller timing run (seconds)')
    p.set_defaults(func=_cmd_selfcheck)

    p = sub.add_parser('digits', help='write scikit-learn digits as an ImageFolder (train/, validation/)')
    p.add_argument('out_dir')
    p.add_argument('--img-size', type=_pixels, default=32)
    p.set_defaults(func=_cmd_digits, friendly_errors=True)

    def export_args(p):
        p.add_argument('checkpoint', help='timm train.py checkpoint (model_best.pth.tar, last.pth.tar, ...)')
        p.add_argument('--ema', action='store_true', help='export the EMA weights (state_dict_ema)')
        p.add_argument('--model', default=None, help='architecture (default: the one recorded in the checkpoint)')
        p.add_argument('--model-kwargs', nargs='*', type=_kv, metavar='KEY=VALUE',
                       help='extra create_model kwargs (default: train.py --model-kwargs from the checkpoint)')
        p.add_argument('--summary', default=None, help='train.py summary.csv for the card (default: next to CKPT)')
        p.add_argument('--dataset', default='', help='dataset name for the model card')

    p = sub.add_parser('export', help='convert a train.py checkpoint to Hugging Face Hub format',
                       description='Write model.safetensors, config.json and README.md (model card) to OUT_DIR.')
    export_args(p)
    p.add_argument('out_dir', help='output folder')
    p.add_argument('--repo-id', default='', help='Hub repo id used in the model card')
    p.set_defaults(func=_cmd_export, friendly_errors=True)

    p = sub.add_parser('push', help='export a train.py checkpoint (or exported folder) and upload it to the Hub',
                       description='Export CHECKPOINT and upload it to REPO_ID (token: HF_TOKEN or `hf auth login`, '
                                   '`huggingface-cli login` before huggingface_hub 1.0). --dry-run writes the folder '
                                   'only.')
    export_args(p)
    p.add_argument('repo_id', help='ORG/NAME')
    p.add_argument('--out-dir', default=None,
                   help='folder to write and keep (default: a temporary folder, removed after the upload)')
    p.add_argument('--private', action='store_true')
    p.add_argument('--dry-run', action='store_true', help='write the folder, upload nothing')
    p.set_defaults(func=_cmd_push, friendly_errors=True)

    p = sub.add_parser('weights', help='print the table of pretrained tags of the ConvNN models')
    p.set_defaults(func=_cmd_weights)

    p = sub.add_parser('bench', help='benchmark ConvNN vs SDPA and timm models (JSON, markdown, plot)',
                       description='Operator level: the ConvNN attention core vs F.scaled_dot_product_attention vs the '
                                   'paper-style implementation; model level: convnn models vs timm\'s, inference and '
                                   'train step. Ratios come from the same run.')
    from .bench import add_arguments as bench_arguments
    bench_arguments(p)
    p.set_defaults(func=_cmd_bench, friendly_errors=True)

    p = sub.add_parser('list', help='table of the registered ConvNN models: params, GFLOPs, K, r, candidates, tags')
    p.add_argument('pattern', nargs='?', help='name pattern (fnmatch, or a word matched as a substring)')
    p.add_argument('--no-flops', action='store_true', help='skip the GFLOPs column (faster)')
    p.set_defaults(func=_cmd_list, friendly_errors=True)

    p = sub.add_parser('info', help='full config and pretrained cfgs of one model')
    p.add_argument('model')
    p.add_argument('--json', action='store_true', help='machine-readable output')
    p.set_defaults(func=_cmd_info, friendly_errors=True)

    p = sub.add_parser('neighbors', help='PNG of the neighbours each ConvNN layer picks for one query position',
                       description='Run MODEL on an image and draw, for every ConvNN layer, the query position and '
                                   'the K neighbours that layer selected (weight as intensity).')
    p.add_argument('model', help='registered name (optionally .tag), or hf-hub:ORG/REPO')
    p.add_argument('--image', help='image file (default: an embedded synthetic scene, works offline)')
    p.add_argument('--pretrained', action='store_true', help='load the pretrained weights of the name / tag')
    p.add_argument('--checkpoint', help='load weights from a checkpoint file (timm load_checkpoint)')
    p.add_argument('--query', help='X,Y pixel of the model input (after resize and crop); default: the centre')
    p.add_argument('--out', default='neighbors.png', help='output PNG (default: neighbors.png)')
    p.add_argument('--layers', nargs='+', help='only these ConvNN layers (module names)')
    p.add_argument('--img-size', type=_pixels,
                   help='input size in pixels; a fixed-size model (ViT) is built for it (default: the model\'s own '
                        'size, which --model-kwargs img_size=N sets)')
    p.add_argument('--model-kwargs', nargs='*', type=_kv, metavar='KEY=VALUE', help='create_model kwargs')
    p.set_defaults(func=_cmd_neighbors, friendly_errors=True)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, 'friendly_errors', False):  # bad names / coordinates / files: one line, no traceback
        try:
            return args.func(args)
        except (ValueError, OSError, PretrainedWeightsError) as e:  # (OSError: a file where a folder goes, ...)
            print(f'timm-convnn {args.command}: error: {e}', file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
