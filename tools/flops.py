#!/usr/bin/env python
"""Print the GFLOPs (multiply-accumulates, the project's one convention: shared/flops.py) of a model or of a
method's configuration. The last line is always `GFLOPs=<value with 3 decimals>`.

    python tools/flops.py --model deit_small_patch16_224
    python tools/flops.py --method tome --model deit_base_patch16_224 --r 16
    python tools/flops.py --method diffrate --model vit_deit_small_patch16_224 --target_flops 2.9
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from tools._dispatch import measure_module  # noqa: E402


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--method', default=None)
    known, _ = pre.parse_known_args(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--method', default=None, help='tome, tocom, diffrate, avit, tavt, toe; none: the plain model')
    if known.method is None:
        parser.add_argument('--model', default='deit_small_patch16_224')
        parser.add_argument('--input-size', default=None, type=int)
        parser.add_argument('--num-classes', default=None, type=int)
        args = parser.parse_args(argv)
        from shared.flops import model_macs
        from shared.models import create_model
        kwargs = {k: v for k, v in (('img_size', args.input_size), ('num_classes', args.num_classes)) if v}
        gflops = model_macs(create_model(args.model, **kwargs)) / 1e9
    else:
        hooks = measure_module(known.method)
        hooks.add_flops_args(parser)
        args = parser.parse_args(argv)
        gflops = hooks.flops(args)
    print(f'GFLOPs={gflops:.3f}')
    return gflops


if __name__ == '__main__':
    main()
