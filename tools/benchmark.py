#!/usr/bin/env python
"""Speed benchmarks of the methods, each measured against its baseline in one run (ratios, never absolute targets).

    python tools/benchmark.py --method tome --model deit_small_patch16_224
    python tools/benchmark.py --method avit ...      # token zipping vs DeiT
    python tools/benchmark.py --method toe ...       # training step time per expansion stage
    python tools/benchmark.py --method tavt ...      # a searched gene vs the full model

Each method's options: python tools/benchmark.py --method NAME --help
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shared.args import CheckedArgumentParser  # noqa: E402
from shared.errors import run_cli  # noqa: E402
from tools._dispatch import MEASURE_MODULES, measure_module  # noqa: E402


def get_parser(argv=None):
    """The parser for this command line: --method, and that method's own flags once it is given."""
    parser = CheckedArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--method', required=True, choices=sorted(MEASURE_MODULES))
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--method', default=None, choices=sorted(MEASURE_MODULES))
    method = pre.parse_known_args(argv)[0].method
    if method is not None:
        measure_module(method).add_benchmark_args(parser)
    return parser


def main(argv=None):
    args = get_parser(argv).parse_args(argv)  # without --method: --help, or the usage error naming it
    return measure_module(args.method).benchmark(args)


if __name__ == '__main__':
    run_cli(main)
