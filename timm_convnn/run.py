""" Run a timm script with the ConvNN models registered.

    python -m timm_convnn.run PATH/TO/train.py --model vit_tiny_convnn_random ...
    torchrun --nproc_per_node 8 -m timm_convnn.run PATH/TO/train.py ...

Imports ``timm_convnn`` (which registers every ConvNN model in timm's registry), then runs the script as
``__main__`` with its own argv, exactly as ``python SCRIPT ARGS`` would (script folder first on ``sys.path``).
timm's ``train.py`` can also load the plugin itself: ``train.py --device-modules timm_convnn ...``.
"""
import os
import runpy
import sys

import timm_convnn  # noqa: F401  (registers the models)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__.strip())
        sys.exit(0 if argv else 2)
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        sys.exit(f'timm_convnn.run: no such script: {argv[0]}')
    sys.argv = [script] + argv[1:]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
