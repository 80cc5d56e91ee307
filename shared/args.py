"""DeiT's command line as argument groups.

Each method's entry script builds its parser from these groups, sets its original's defaults with
`parser.set_defaults(...)`, then adds its own flags. Spellings are DeiT's, dashes and underscores mixed exactly as
upstream (`--batch-size` but `--output_dir`), because argparse does not alias the two.
"""
import argparse
import os


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ('yes', 'true', 't', 'y', '1'):
        return True
    if v.lower() in ('no', 'false', 'f', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError(f'boolean value expected, got {v!r}')


def add_model_args(parser):
    g = parser.add_argument_group('model')
    g.add_argument('--batch-size', default=64, type=int)
    g.add_argument('--epochs', default=300, type=int)
    g.add_argument('--bce-loss', action='store_true')
    g.add_argument('--unscale-lr', action='store_true')
    g.add_argument('--model', default='deit_base_patch16_224', type=str, metavar='MODEL', help='name of model to train')
    g.add_argument('--input-size', default=224, type=int, help='images input size')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    g.add_argument('--drop-path', type=float, default=0.1, metavar='PCT', help='drop path rate')
    g.add_argument('--model-ema', action='store_true')
    g.add_argument('--no-model-ema', action='store_false', dest='model_ema')
    g.set_defaults(model_ema=True)
    g.add_argument('--model-ema-decay', type=float, default=0.99996)
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False)
    return g


def add_optimizer_args(parser):
    g = parser.add_argument_group('optimizer')
    g.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER')
    g.add_argument('--opt-eps', default=1e-8, type=float, metavar='EPSILON')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradient norm')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=float, default=0.05)
    return g


def add_scheduler_args(parser):
    g = parser.add_argument_group('learning rate schedule')
    g.add_argument('--sched', default='cosine', type=str, metavar='SCHEDULER')
    g.add_argument('--lr', type=float, default=5e-4, metavar='LR')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct')
    g.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT')
    g.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV')
    g.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR')
    g.add_argument('--min-lr', type=float, default=1e-5, metavar='LR')
    g.add_argument('--decay-epochs', type=float, default=30, metavar='N')
    g.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    g.add_argument('--cooldown-epochs', type=int, default=10, metavar='N')
    g.add_argument('--patience-epochs', type=int, default=10, metavar='N')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')
    return g


def add_augmentation_args(parser):
    g = parser.add_argument_group('augmentation')
    g.add_argument('--color-jitter', type=float, default=0.3, metavar='PCT')
    g.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', type=str, default='bicubic')
    g.add_argument('--repeated-aug', action='store_true')
    g.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug')
    g.set_defaults(repeated_aug=True)
    g.add_argument('--train-mode', action='store_true')
    g.add_argument('--no-train-mode', action='store_false', dest='train_mode')
    g.set_defaults(train_mode=True)
    g.add_argument('--ThreeAugment', action='store_true')
    g.add_argument('--src', action='store_true', help='simple random crop')
    g.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='random erase prob')
    g.add_argument('--remode', type=str, default='pixel', help='random erase mode')
    g.add_argument('--recount', type=int, default=1, help='random erase count')
    g.add_argument('--resplit', action='store_true', default=False)
    return g


def add_mixup_args(parser):
    g = parser.add_argument_group('mixup / cutmix')
    g.add_argument('--mixup', type=float, default=0.8)
    g.add_argument('--cutmix', type=float, default=1.0)
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', type=str, default='batch', help='"batch", "pair", or "elem"')
    return g


def add_distillation_args(parser):
    g = parser.add_argument_group('distillation')
    g.add_argument('--teacher-model', default='regnety_160', type=str, metavar='MODEL')
    g.add_argument('--teacher-path', type=str, default='')
    g.add_argument('--distillation-type', default='none', choices=['none', 'soft', 'hard'], type=str)
    g.add_argument('--distillation-alpha', default=0.5, type=float)
    g.add_argument('--distillation-tau', default=1.0, type=float)
    g.add_argument('--cosub', action='store_true')
    return g


def add_finetune_args(parser):
    g = parser.add_argument_group('fine-tuning')
    g.add_argument('--finetune', default='', help='finetune from checkpoint')
    g.add_argument('--attn-only', action='store_true')
    return g


def add_data_args(parser):
    g = parser.add_argument_group('data')
    g.add_argument('--data-path', default='/datasets01/imagenet_full_size/061417/', type=str)
    g.add_argument('--data-set', default='IMNET', type=str, help='IMNET, CIFAR, CIFAR10, CUB, CARS, DOGS, FLOWERS, '
                   'NABIRDS, INAT, INAT18, INAT19, INAT2017, DIGITS (embedded), FAKE (generated)')
    g.add_argument('--inat-category', default='name', type=str,
                   choices=['kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name'])
    g.add_argument('--eval-crop-ratio', default=0.875, type=float, help='Crop ratio for evaluation')
    g.add_argument('--fake-size', default=256, type=int, help='images per split of the FAKE data set')
    g.add_argument('--fake-classes', default=10, type=int, help='classes of the FAKE data set')
    return g


def add_run_args(parser):
    g = parser.add_argument_group('run control')
    g.add_argument('--output_dir', default='', help='path where to save, empty for no saving')
    g.add_argument('--device', default='cuda', help='device to use for training / testing')
    g.add_argument('--seed', default=0, type=int)
    g.add_argument('--resume', default='', help='resume from checkpoint')
    g.add_argument('--auto-resume', action='store_true', default=True,
                   help='resume from <output_dir>/checkpoint.pth when it exists (default on)')
    g.add_argument('--no-auto-resume', action='store_false', dest='auto_resume')
    g.add_argument('--start_epoch', default=0, type=int, metavar='N', help='start epoch')
    g.add_argument('--eval', action='store_true', help='Perform evaluation only')
    g.add_argument('--dist-eval', action='store_true', default=False, help='Enabling distributed evaluation')
    g.add_argument('--num_workers', default=10, type=int)
    g.add_argument('--pin-mem', action='store_true')
    g.add_argument('--no-pin-mem', action='store_false', dest='pin_mem')
    g.set_defaults(pin_mem=True)
    g.add_argument('--amp', action='store_true', default=None,
                   help='mixed precision (default: on for CUDA, off on the CPU)')
    g.add_argument('--no-amp', action='store_false', dest='amp')
    g.add_argument('--print-freq', default=10, type=int, help='progress line every N iterations')
    return g


def add_distributed_args(parser):
    g = parser.add_argument_group('distributed')
    g.add_argument('--distributed', action='store_true', default=False)
    g.add_argument('--world_size', default=1, type=int, help='number of distributed processes')
    g.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    # The old launcher passes --local_rank (torch<2) or --local-rank (torch>=2) unless --use_env is given.
    g.add_argument('--local_rank', '--local-rank', default=int(os.environ.get('LOCAL_RANK', 0)), type=int)
    return g


DEIT_GROUPS = (add_model_args, add_optimizer_args, add_scheduler_args, add_augmentation_args, add_mixup_args,
               add_distillation_args, add_finetune_args, add_data_args, add_run_args, add_distributed_args)


def deit_parser(description='DeiT training and evaluation script', add_help=True, **defaults):
    """DeiT's full parser; keyword arguments override defaults (by dest name)."""
    parser = argparse.ArgumentParser(description, add_help=add_help)
    for add in DEIT_GROUPS:
        add(parser)
    if defaults:
        parser.set_defaults(**defaults)
    return parser
