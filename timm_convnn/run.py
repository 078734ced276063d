""" Run a timm script with the ConvNN models registered.

    python -m timm_convnn.run PATH/TO/train.py --model vit_tiny_convnn_random ...
    torchrun --nproc_per_node 8 -m timm_convnn.run PATH/TO/train.py ...

Imports ``timm_convnn`` (which registers every ConvNN model in timm's registry), then runs the script as
``__main__`` with its own argv, exactly as ``python SCRIPT ARGS`` would (script folder first on ``sys.path``).
timm's ``train.py`` can also load the plugin itself: ``train.py --device-modules timm_convnn ...``.

With Pillow >= 13 it also restores the 0-bit posterize that timm's RandAugment relies on
(``posterize_zero_bits_as_black``): run the scripts through it (or the launchers in ``train_scripts/``) for recipes
with ``aa: rand-*``.
"""
import os
import runpy
import sys

from PIL import Image
from timm.data import auto_augment

import timm_convnn  # noqa: F401  (registers the models)

_timm_posterize = auto_augment.posterize  # (timm's own, taken when this module is imported, before any patch)


def posterize_or_black(img, bits_to_keep, **kwargs):
    """timm's posterize op, except that 0 bits (or fewer) give a black image of the same mode and size, as Pillow
    < 13 gave. A module-level function, so that augmentations holding it pickle (DataLoader workers started with
    ``spawn`` / ``forkserver``, the default on macOS and Windows, unpickle it from here)."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kwargs)


def posterize_zero_bits_as_black() -> bool:
    """Pillow >= 13 refuses to posterize to 0 bits ("bits must be between or equal to 1 and 8"), which timm's
    RandAugment asks for at its largest magnitudes (``PosterizeIncreasing`` at level 10: ``rand-m9-mstd0.5-inc1``,
    the ImageNet recipes' policy, reaches it under its magnitude noise, within the first batches), and which older
    Pillow turned into a black image. Gives timm's posterize ops that behaviour back (a black image of the same mode
    and size) where this Pillow refuses 0 bits; returns whether it did. Any other number of bits is Pillow's own."""
    from PIL import ImageOps
    probe = Image.new('L', (1, 1), 255)
    try:
        ImageOps.posterize(probe, 0)
        return False  # (this Pillow takes 0 bits)
    except ValueError:
        pass
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is _timm_posterize:
            auto_augment.NAME_TO_OP[name] = posterize_or_black
    auto_augment.posterize = posterize_or_black
    return True


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__.strip())
        sys.exit(0 if argv else 2)
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        print(f'timm_convnn.run: no such script: {argv[0]}', file=sys.stderr)
        sys.exit(2)  # (as python exits on a script it cannot open)
    posterize_zero_bits_as_black()  # (timm's RandAugment under Pillow >= 13)
    sys.argv = [script] + argv[1:]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
