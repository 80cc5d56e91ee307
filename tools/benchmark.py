#!/usr/bin/env python
"""Speed benchmarks of the methods, each measured against its baseline in one run (ratios, never absolute targets).

    python tools/benchmark.py --method tome --model deit_small_patch16_224
    python tools/benchmark.py --method avit ...      # token zipping vs DeiT
    python tools/benchmark.py --method toe ...       # training step time per expansion stage
    python tools/benchmark.py --method tavt ...      # a searched gene vs the full model

Each method's options: python tools/benchmark.py --method NAME --help. With --compile (tome, tocom, diffrate, avit,
tavt) every forward is also timed torch.compile'd in the same rounds, against the compiled baseline and the eager one.

    python tools/benchmark.py --all --out benchmarks   # every method vs its baseline, one table (--compile too)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shared.args import CheckedArgumentParser  # noqa: E402
from shared.errors import run_cli  # noqa: E402
from shared.methods import NAMES  # noqa: E402
from tools._dispatch import measure_module  # noqa: E402


def get_parser(argv=None):
    """The parser for this command line: --method, and that method's own flags once it is given."""
    parser = CheckedArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--method', default=None, choices=sorted(NAMES))
    pre.add_argument('--all', action='store_true')
    known = pre.parse_known_args(argv)[0]
    method = known.method
    parser.add_argument('--method', required=not known.all, choices=sorted(NAMES))
    if known.all:
        parser.add_argument('--all', action='store_true', help='the grid of every method against its baseline')
        parser.add_argument('--compile', action='store_true', help='also torch.compile both models of each pair')
        parser.add_argument('--out', default='benchmarks', help='folder of bench.md and bench.csv')
        parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
        parser.add_argument('--compile-backend', default='inductor', help='torch.compile backend of the compiled '
                            'rows (eager: trace only, for a quick check of the graphs)')
        parser.add_argument('--methods', nargs='+', default=None, choices=NAMES,
                            help='a subset of the grid\'s methods (default: all, in registry order)')
        parser.add_argument('--batch-sizes', nargs='+', type=int, default=None, help='default 1 64 256 (GPU), 1 (CPU)')
        parser.add_argument('--dtypes', nargs='+', default=None, choices=['float32', 'float16', 'bfloat16'])
        parser.add_argument('--rounds', type=int, default=None)
        parser.add_argument('--runs', type=int, default=None)
        parser.add_argument('--compile-batch-sizes', nargs='+', type=int, default=None,
                            help='batch sizes that also get compiled rows (default 256 on a GPU, 1 on the CPU)')
        parser.add_argument('--compile-dtypes', nargs='+', default=None, choices=['float32', 'float16', 'bfloat16'],
                            help='dtypes that also get compiled rows (default float16 on a GPU, float32 on the CPU)')
    elif method is not None:
        measure_module(method).add_benchmark_args(parser)
    return parser


def main(argv=None):
    args = get_parser(argv).parse_args(argv)  # without --method: --help, or the usage error naming it
    if getattr(args, 'all', False):
        from tools.bench_grid import run_grid
        return run_grid(args.device, args.out, args.methods or NAMES, args.compile, args.batch_sizes, args.dtypes,
                        args.rounds, args.runs, backend=args.compile_backend,
                        compile_batch_sizes=args.compile_batch_sizes, compile_dtypes=args.compile_dtypes)
    return measure_module(args.method).benchmark(args)


if __name__ == '__main__':
    run_cli(main)
