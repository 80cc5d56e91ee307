"""Convert a published checkpoint into a timm model's state dict: `python tools/convert.py SRC DST --model NAME`.

SRC: a Google ViT `.npz`, a DeiT `.pth` ({'model': ...}), a plain or DDP (`module.`) timm state dict, or an MAE
fine-tuned checkpoint. DST gets {'model': state_dict} (DeiT's layout), checked to load strictly into NAME (built
with --num-classes / --img-size / --global-pool) unless the head is left out on purpose (--no-head)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout too

from shared.args import check_checkpoint_file, check_finite_weights  # noqa: E402
from shared.checkpoint import atomic_save, convert_checkpoint, load_weights  # noqa: E402
from shared.errors import UserError, run_cli  # noqa: E402
from shared.models import create_model  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser('Convert a checkpoint into a timm model state dict', add_help=True,
                                     allow_abbrev=False)
    parser.add_argument('src', help='.npz (Google ViT) or .pth/.bin (DeiT, timm, DDP, MAE)')
    parser.add_argument('dst', help='output .pth ({"model": state_dict})')
    parser.add_argument('--model', required=True, help='timm model name, e.g. deit_small_patch16_224')
    parser.add_argument('--num-classes', type=int, default=None, help='head size (default: the model default)')
    parser.add_argument('--img-size', type=int, default=None, help='input size; the position embedding is resized')
    parser.add_argument('--global-pool', default=None, help="'avg' for MAE fine-tuned ViTs (fc_norm), 'token' ...")
    parser.add_argument('--pos-embed-interp', default=None, choices=['bicubic', 'bilinear', 'nearest'],
                        help='position-embedding resampling (default: bilinear for .npz as ViT-pytorch/TAVT, '
                             'bicubic otherwise as DeiT/timm)')
    parser.add_argument('--align-corners', action='store_true', default=None,
                        help='align_corners for the resampling (default: on for .npz, off otherwise)')
    parser.add_argument('--no-head', action='store_true', help='drop the classifier head (fine-tuning elsewhere)')
    return parser


def main(argv=None):
    """0 when DST was written; 1 (after one `error:` line on stderr) when SRC cannot become NAME's weights."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for flag, v in (('--num-classes', args.num_classes), ('--img-size', args.img_size)):
        if v is not None and v < 1:
            parser.error(f'{flag} {v}: must be at least 1')
    kwargs = {k: v for k, v in (('num_classes', args.num_classes), ('img_size', args.img_size),
                                ('global_pool', args.global_pool)) if v is not None}
    try:
        model = create_model(args.model, **kwargs)
    except (RuntimeError, ValueError) as e:  # an unknown model name
        raise UserError(f'--model {args.model}: {e}') from None
    try:
        check_checkpoint_file(args.src, 'SRC')
        state_dict = convert_checkpoint(args.src, model, args.pos_embed_interp, args.align_corners)
        check_finite_weights(state_dict, args.src, 'SRC')
        if args.no_head:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith('head.')}
        result = load_weights(model, state_dict, strict=not args.no_head, source=args.src)
    except UserError as e:  # CheckpointError included
        print(f'error: {e}', file=sys.stderr)
        return 1
    atomic_save({'model': state_dict}, args.dst)
    missing = list(getattr(result, 'missing_keys', []) or [])
    print(f'wrote {args.dst}: {len(state_dict)} tensors for {args.model}'
          + (f' (left to initialise: {", ".join(missing)})' if missing else ''))
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main))
