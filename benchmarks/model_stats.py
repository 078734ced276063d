"""Parameter and GFLOP counts of ConvNN models next to the timm models they modify (shape-only, seconds, no GPU).

    python benchmarks/model_stats.py            # markdown table, as in the README
    python benchmarks/model_stats.py --json

GFLOPs per 224 px image: matrix products and convolutions as torch's FlopCounterMode counts them (the convention of
timm's and the paper's tables); "+ aggregation" adds the ConvNN Conv1d(kernel K) term that the paper's profiler
counted as a depthwise conv but that runs here as elementwise work.
"""
import argparse
import json

import timm

import timm_convnn  # noqa: F401
from timm_convnn.utils import convnn_aggregation_flops, count_flops, count_params

PAIRS = [
    ('vit_base_patch16_224', 'vit_base_convnn_all_k16'),
    ('vit_base_patch16_224', 'vit_base_convnn_all'),
    ('vit_base_patch16_224', 'vit_base_convnn_random'),
    ('vit_base_patch16_224', 'vit_base_convnn_spatial'),
    ('vit_tiny_patch16_224', 'vit_tiny_convnn_random'),
]


def model_stats(name: str) -> dict:
    model = timm.create_model(name, device='meta')
    size = model.pretrained_cfg['input_size']
    return dict(
        model=name,
        params_m=count_params(model) / 1e6,
        gflops=count_flops(model, size) / 1e9,
        aggregation_gflops=convnn_aggregation_flops(model, size) / 1e9,
    )


def markdown_row(r: dict) -> str:
    return (f"| `{r['model']}` | {r['params_m']:.3f} | {r['gflops']:.3f} | "
            f"{r['gflops'] + r['aggregation_gflops']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--json', action='store_true')
    args = parser.parse_args()
    rows = [model_stats(n) for n in dict.fromkeys(n for pair in PAIRS for n in pair)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print('| model | params (M) | GFLOPs (matmul + conv) | GFLOPs + aggregation |')
    print('|---|---|---|---|')
    for r in rows:
        print(markdown_row(r))


if __name__ == '__main__':
    main()
