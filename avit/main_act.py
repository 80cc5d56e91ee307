"""A-ViT training, evaluation and `--demo` (the official main_act.py's command line on timm 1.0).

    torchrun --nproc_per_node=4 avit/main_act.py --model avit_tiny_patch16_224 --data-path IMAGENET \
        --output_dir results/tiny --pretrained --batch-size 128 --lr 0.0005 --tensorboard --epochs 100 \
        --gate_scale 10.0 --gate_center 30 --warmup-epochs 5 --ponder_token_scale 0.0005 --distr_prior_alpha 0.001

A run restarted with the same --output_dir continues from its checkpoint (--no-auto-resume to start over instead,
which refuses an output dir that already holds one).

Deviations from the original, all fixes of crashes or additions:
- runs single-process and on the CPU (the original needs DDP and CUDA);
- python's random is seeded (RandAugment draws from it), so the same command gives the same run; the checkpoint
  is written after evaluation, with every RNG state, and the best epoch is kept as best_checkpoint.pth (DeiT's);
- `--pretrained` reads the DeiT checkpoint from a local file (`--pretrained PATH`, or the official file name in
  torch.hub's checkpoint folder) instead of downloading it;
- the gate values of `--finetune`/`--demo` come from `--gate_scale`/`--gate_center` when given; the file name
  (`<name>-<scale>-<center>.pth`) is only a fallback, and a name that does not parse no longer crashes;
- evaluation also prints the mean token depth and the GFLOPs averaged over the evaluated images;
- evaluation removes halted tokens (same logits, less time); `--no-zip-tokens` keeps the masked loop.
"""
import os
import re
import sys
from pathlib import Path

import torch

from shared.args import deit_parser
from shared.checkpoint import CheckpointError, load_finetune, load_training_state  # noqa: F401 (re-exported)
from shared.datasets import build_dataset, build_loaders
from shared.engine import (TensorboardLogger, build_criterion, build_mixup, build_optimization, prepare_model,
                           start_run)
from shared.errors import UserError, run_cli
from shared.trainer import Trainer
from shared.models import create_model
from avit.engine_act import evaluate, train_one_epoch, visualize
from avit.models_act import DEIT_START_POINTS, avit_models


def get_args_parser(add_help=True):
    parser = deit_parser('A-ViT training and evaluation script', add_help=add_help)
    # The A-ViT parser's defaults where they differ from the shared DeiT groups.
    parser.set_defaults(model='avit_tiny_patch16_224', color_jitter=0.4, print_freq=100)
    g = parser.add_argument_group('A-ViT')
    g.add_argument('--ponder_token_scale', default=0.001, type=float, help='weight of the token ponder loss')
    g.add_argument('--pretrained', nargs='?', const=True, default=False, metavar='PATH',
                   help='start from the DeiT checkpoint: a local file, or (bare flag) the official file name in '
                        "torch.hub's checkpoint folder")
    g.add_argument('--act_mode', default=4, type=int, help='must be 4 (token ACT); 1-3 were exploration modes')
    g.add_argument('--tensorboard', action='store_true', help='write TensorBoard scalars into --output_dir')
    g.add_argument('--gate_scale', default=100., type=float, help='gamma: scale of the halting input')
    g.add_argument('--gate_center', default=3., type=float, help='beta: subtracted after scaling')
    g.add_argument('--warmup_epoch', default=0, type=int, help='declared by the original, never read')
    g.add_argument('--distr_prior_alpha', default=0.01, type=float,
                   help='weight of the KL distributional prior; <= 0 turns it off')
    g.add_argument('--demo', action='store_true', help='write the token-depth visualisation of the val set and exit')
    g2 = parser.add_argument_group('A-ViT additions (defaults = the original behaviour)')
    g2.add_argument('--zip-tokens', action='store_true', default=True,
                    help='inference with halted tokens removed (same logits as the masked loop, faster; default)')
    g2.add_argument('--no-zip-tokens', action='store_false', dest='zip_tokens',
                    help="evaluate with the original's masked loop (training always uses it)")
    g2.add_argument('--prior-batch-axis-quirk', action='store_true', default=True,
                    help="the original per-layer halting statistic mean(h[1:]) over images 2..B and all tokens")
    g2.add_argument('--no-prior-batch-axis-quirk', action='store_false', dest='prior_batch_axis_quirk',
                    help='average the halting scores over the patch tokens of every image instead (issue #4)')
    g2.add_argument('--distr_prior_target', default='original', choices=['original', 'normalized'],
                    help="'original': the unnormalised Gaussian target (sums to 3.26); 'normalized': divided by "
                         'its sum')
    g2.add_argument('--demo-dir', default='./token_act_visualization/', help='where --demo writes its pictures')
    return parser


GATE_FLAGS = ('--gate_scale', '--gate_center')


def explicit_flags(argv):
    return {a.split('=')[0] for a in argv if a.startswith('--')}


def gates_from_file_name(path):
    """(scale, center) from `<anything>-<scale>-<center>.pth`, or None. Unlike the original, the extension is
    cut once at the end, so `tiny-10.0-30.0.pth` parses too."""
    stem = os.path.basename(path)
    stem = re.sub(r'\.(pth|pt|bin|tar)$', '', stem)
    parts = stem.split('-')
    if len(parts) < 3:
        return None
    try:
        return float(parts[-2]), float(parts[-1])
    except ValueError:
        return None


def resolve_gates(args, argv):
    """Gate values: flags given on the command line win; else the checkpoint name's (official convention); else the
    parser defaults. The original took the file name always and crashed on `checkpoint.pth`."""
    given = explicit_flags(argv)
    path = args.finetune
    if not path:
        return
    parsed = None
    if 'visualize' in path:
        parsed = (5., 50.)  # the official demo checkpoint's values
    elif not path.startswith('https'):
        parsed = gates_from_file_name(path)
    if parsed is None:
        if not all(f in given for f in GATE_FLAGS):
            print(f'| {os.path.basename(path)} does not name its gates (<name>-<scale>-<center>.pth): using '
                  f'--gate_scale {args.gate_scale} --gate_center {args.gate_center}')
        return
    if '--gate_scale' not in given:
        args.gate_scale = parsed[0]
    if '--gate_center' not in given:
        args.gate_center = parsed[1]


def demo_model(args, argv):
    """The official --demo picks the model from the checkpoint name; an explicit --model wins here."""
    args.batch_size = 50
    if '--model' in explicit_flags(argv):
        return
    name = os.path.basename(args.finetune)
    if 'visualize' in name or 'tiny' in name:
        args.model = 'avit_tiny_patch16_224'
    elif 'small' in name:
        args.model = 'avit_small_patch16_224'
    else:
        raise UserError(f'--demo: cannot tell the model from the checkpoint name {name!r} (expected "tiny" or '
                        '"small" in it); pass --model')


def check_args(args):
    if args.act_mode != 4:
        raise UserError(f'--act_mode {args.act_mode}: only 4 (token-level ACT) exists; modes 1-3 were exploration '
                        'modes that the original also rejects')
    if args.distillation_type != 'none':
        raise UserError('--distillation-type must be none: the A-ViT model has no distillation head (the original '
                        'crashes in DistillationLoss)')
    if args.demo and not args.finetune:
        raise UserError('--demo needs --finetune <A-ViT checkpoint>')
    for flag, path in (('--finetune', args.finetune), ('--resume', args.resume)):
        if path and not os.path.isfile(path):
            raise UserError(f'{flag}: checkpoint not found: {path}')


def state_dict_of(checkpoint):
    return checkpoint['model'] if isinstance(checkpoint, dict) and 'model' in checkpoint else checkpoint


def pretrained_path(args):
    if args.pretrained is True:
        name = DEIT_START_POINTS.get(args.model)
        if name is None:
            raise UserError(f'--pretrained: no DeiT start point is known for {args.model}; pass --pretrained PATH')
        path = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
        if not os.path.isfile(path):
            raise UserError(f'--pretrained: {path} not found. Nothing is downloaded here: put the DeiT checkpoint '
                            f'https://dl.fbaipublicfiles.com/deit/{name} there, or pass --pretrained PATH')
        return path
    if not os.path.isfile(args.pretrained):
        raise UserError(f'--pretrained: checkpoint not found: {args.pretrained}')
    return args.pretrained


def build_avit(args, num_classes):
    return create_model(args.model, avit_models, num_classes=num_classes, drop_rate=args.drop,
                        drop_path_rate=args.drop_path, drop_block_rate=None, img_size=args.input_size,
                        gate_scale=args.gate_scale, gate_center=args.gate_center,
                        prior_batch_axis_quirk=args.prior_batch_axis_quirk, zip_tokens=args.zip_tokens)


def main(args):
    device, amp, _ = start_run(args)  # python's random seeded too (the original left it unseeded)

    dataset_train, args.nb_classes = build_dataset(is_train=True, args=args)
    dataset_val, _ = build_dataset(is_train=False, args=args)
    # the official loaders: distributed samplers even as a world of one, eval at the training batch size (the demo
    # needs 50 images a batch), no dropped batches
    data_loader_train, data_loader_val = build_loaders(args, dataset_train, dataset_val, eval_batch_size=args.batch_size,
                                                       samplers_always_distributed=True, drop_last=False)
    mixup_fn = build_mixup(args, args.nb_classes)

    print(f'Creating model: {args.model}')
    model = build_avit(args, args.nb_classes)
    if args.pretrained:
        path = pretrained_path(args)
        # The official factory loads the DeiT `model` entry non-strictly; nothing is renamed.
        load_finetune(model, path, '--pretrained')
        print(f'Loaded DeiT start point {path}')
    if args.finetune:
        load_finetune(model, args.finetune, '--finetune')
    if args.finetune:
        model.gate_scale, model.gate_center = args.gate_scale, args.gate_center
        print('Setting h gate scale as {} and bias as {}'.format(args.gate_scale, args.gate_center))
    # The official run passes find_unused_parameters=True; the halting loop uses every parameter.
    model, model_without_ddp, model_ema, n_parameters = prepare_model(model, args, device)

    optimizer, loss_scaler, lr_scheduler = build_optimization(args, model_without_ddp, device)
    criterion = build_criterion(args, mixup_fn)

    tb_logger = None
    if args.tensorboard:
        tb_logger = TensorboardLogger(os.path.join(Path.cwd(), args.output_dir))

    if args.demo or args.eval:
        # an explicit --resume only: neither writes into --output_dir
        load_training_state(args, model_without_ddp, optimizer, lr_scheduler, loss_scaler, model_ema)
    if args.demo:
        visualize(data_loader_val, model, device, args=args, out_dir=args.demo_dir, amp=amp)
        return

    if args.eval:
        test_stats, _ = evaluate(data_loader_val, model, device, epoch=0, tb_logger=tb_logger, args=args, amp=amp)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {test_stats['acc1']:.1f}%")
        if tb_logger is not None:
            tb_logger.close()
        return

    def train_epoch(epoch):
        return train_one_epoch(
            model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler, args.clip_grad, model_ema,
            mixup_fn, set_training_mode=args.finetune == '',  # the original fine-tunes in eval mode
            args=args, tb_logger=tb_logger, amp=amp)

    def evaluate_epoch(epoch):
        test_stats, _ = evaluate(data_loader_val, model, device, epoch, tb_logger=tb_logger, args=args, amp=amp)
        return test_stats

    trainer = Trainer(args, model_without_ddp, optimizer, lr_scheduler, loss_scaler, train_loader=data_loader_train,
                      train_epoch=train_epoch, evaluate=evaluate_epoch, model_ema=model_ema,
                      n_parameters=n_parameters, tb_logger=tb_logger, val_images=len(dataset_val))
    trainer.resume()
    trainer.fit()


def parse(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    check_args(args)
    if args.output_dir:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if args.demo:
        demo_model(args, argv)
    resolve_gates(args, argv)
    return args


if __name__ == '__main__':
    run_cli(lambda: main(parse()))
