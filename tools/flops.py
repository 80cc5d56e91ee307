#!/usr/bin/env python
"""Print the GFLOPs (multiply-accumulates, the project's one convention: shared/flops.py) of a model or of a
method's configuration. The last line is always `GFLOPs=<value with 3 decimals>` (the mean over the images for a
data-dependent method, A-ViT, whose distribution over the images is printed above it).

    python tools/flops.py --model deit_small_patch16_224
    python tools/flops.py --method tome --model deit_base_patch16_224 --r 16
    python tools/flops.py --method diffrate --model vit_deit_small_patch16_224 --target_flops 2.9
    python tools/flops.py --method avit --data-set DIGITS --input-size 32 --num-images 64
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from shared.args import CheckedArgumentParser  # noqa: E402
from shared.errors import UserError, run_cli  # noqa: E402
from shared.methods import NAMES as METHOD_NAMES  # noqa: E402
from tools._dispatch import measure_module  # noqa: E402


def method_of(argv):
    """--method alone, before the method's own flags are known (a name it does not know is a usage error)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--method', default=None, choices=sorted(METHOD_NAMES))
    return pre.parse_known_args(argv)[0].method


def check_data_given(args, parser):
    """Methods whose FLOPs depend on the images (A-ViT) read a data set; without one, say what to pass."""
    if getattr(args, 'data_path', None) == '' and str(getattr(args, 'data_set', '')).upper() not in ('DIGITS', 'FAKE') \
            and not getattr(args, 'full_depth', False):
        parser.error(f'--method {args.method}: its FLOPs depend on the images, so it evaluates a data set: give '
                     f'--data-path DIR (the --data-set {args.data_set} root), or --data-set DIGITS for the embedded '
                     'one, or --full-depth for the uncompressed count without data')


QUANTILES = (('p5', 0.05), ('p50', 0.5), ('p95', 0.95))


def distribution(per_image_gflops):
    """mean, p5, p50, p95, min, max of per-image GFLOPs (quantiles linearly interpolated, numpy's default)."""
    values = torch.as_tensor(per_image_gflops, dtype=torch.float64).flatten()
    stats = {'mean': float(values.mean())}
    stats.update({name: float(torch.quantile(values, q)) for name, q in QUANTILES})
    stats.update(min=float(values.min()), max=float(values.max()), images=len(values))
    return stats


def format_distribution(stats):
    return (f"GFLOPs per image over {stats['images']} images: "
            + ', '.join(f'{k} {stats[k]:.3f}' for k in ('mean', 'p5', 'p50', 'p95', 'min', 'max')))


def get_parser(argv=None):
    """The parser for this command line: the plain model's flags, or --method's own (its hook adds them)."""
    method = method_of(argv)
    parser = CheckedArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--method', default=None, choices=sorted(METHOD_NAMES),
                        help='a method\'s configuration; none: the plain model')
    if method is None:
        parser.add_argument('--model', default='deit_small_patch16_224')
        parser.add_argument('--input-size', default=None, type=int)
        parser.add_argument('--num-classes', default=None, type=int)
    else:
        measure_module(method).add_flops_args(parser)
    return parser


def main(argv=None):
    parser = get_parser(argv)
    args = parser.parse_args(argv)
    if args.method is None:
        from shared.flops import model_macs
        from shared.models import create_model
        kwargs = {k: v for k, v in (('img_size', args.input_size), ('num_classes', args.num_classes)) if v}
        try:
            model = create_model(args.model, **kwargs)
        except (RuntimeError, ValueError) as e:  # an unknown model name
            raise UserError(f'--model {args.model}: {e}') from None
        gflops = model_macs(model) / 1e9
    else:
        check_data_given(args, parser)
        hooks = measure_module(args.method)
        if hasattr(hooks, 'flops_per_image'):  # data dependent: the spread over the images, then their mean
            gflops, per_image = hooks.flops_per_image(args)
            print(format_distribution(distribution(per_image)))
        else:
            gflops = hooks.flops(args)
    print(f'GFLOPs={gflops:.3f}')
    return gflops


if __name__ == '__main__':
    run_cli(main)
