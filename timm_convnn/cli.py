""" ``timm-convnn`` command line. """
import argparse
import sys
from typing import List, Optional

from .version import __version__


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck
    return run_selfcheck(quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-convnn', description='Convolutional Nearest Neighbors (arXiv 2511.14137) for timm.')
    parser.add_argument('--version', action='version', version=f'timm-convnn {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    for name, help_text in (
            ('demo', 'run the demo (for now: the operator self-check, on this machine)'),
            ('selfcheck', 'check the attention and convolution identities and time ConvNN against SDPA'),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument('--quick', action='store_true', help='smaller timing run (seconds)')
        p.set_defaults(func=_cmd_selfcheck)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
