"""Benchmark harness entry point (same as ``timm-convnn bench``): see ``timm_convnn/bench.py`` for what it measures.

    python benchmarks/bench.py --ops --device cpu --tokens 197 785 3137 --out benchmarks/results/cpu
    python benchmarks/bench.py --ops --models --device cuda --amp --out bench-out/h200
"""
from timm_convnn.bench import main

if __name__ == '__main__':
    main()
