"""DeiT's command line as argument groups, and the checks of what a user passed.

Each method's entry script builds its parser from these groups, sets its original's defaults with
`parser.set_defaults(...)`, then adds its own flags. Spellings are DeiT's, dashes and underscores mixed exactly as
upstream (`--batch-size` but `--output_dir`), because argparse does not alias the two. Parsers never accept
abbreviations (`allow_abbrev=False`): a prefix that silently means another flag is worse than an error.

After parsing, `validate_common(args, parser)` refuses values that cannot mean anything (`--epochs 0`, a negative
`--r`, an input size that is not a whole number of patches, an unknown `--data-set`) as a usage error, before any data
or weights are read; `check_train_batches` and `check_finite_weights` catch what is only known later.
"""
import argparse
import math
import os
import re


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
    g.add_argument('--accum-iter', '--accum_iter', dest='accum_iter', type=int, default=1, metavar='N',
                   help='accumulate gradients over N batches per optimizer step (MAE\'s flag): a global batch of '
                        'batch-size x processes x N, e.g. an 8-GPU recipe on 2 GPUs with N = 4')
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


class CheckedArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser without abbreviations that runs `validate_common` on what it parsed."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        validate_common(parsed, self)
        return parsed, extras


def deit_parser(description='DeiT training and evaluation script', add_help=True, **defaults):
    """DeiT's full parser (checked: see validate_common); keyword arguments override defaults (by dest name)."""
    parser = CheckedArgumentParser(description, add_help=add_help)
    for add in DEIT_GROUPS:
        add(parser)
    if defaults:
        parser.set_defaults(**defaults)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Checks of what the user passed

# dests (of any script's parser) whose every value must be >= 1, resp. >= 0
POSITIVE = ('epochs', 'batch_size', 'input_size', 'img_size', 'granularity', 'runs', 'rounds', 'num_steps',
            'eval_every', 'gradient_accumulation_steps', 'baseline_epochs', 'throughput_batch', 'fake_size',
            'fake_classes', 'batch_sizes')
NON_NEGATIVE = ('r', 'tome_r', 'warmup', 'num_workers', 'threads', 'warmup_epochs', 'start_epoch')


def flag_of(parser, dest):
    """The long option strings that set `dest` in `parser`, e.g. '--tome-r/--r', or --dest."""
    flags = [o for action in parser._actions if action.dest == dest for o in action.option_strings]
    flags = [o for o in flags if o.startswith('--')] or flags
    return '/'.join(flags) or '--' + dest


def _values(value):
    return value if isinstance(value, (list, tuple)) else [value]


def patch_size_of(model_name):
    """The patch size a model name states (`deit_small_patch16_224` -> 16), else None (e.g. CAFormer, LV-ViT)."""
    match = re.search(r'patch(\d+)', str(model_name or ''))
    return int(match.group(1)) if match else None


def known_data_sets():
    from shared.datasets import DATA_SETS, FINE_GRAINED
    return tuple(dict.fromkeys((*DATA_SETS, 'CIFAR100', *FINE_GRAINED)))


def validate_common(args, parser):
    """parser.error (usage, exit 2) on values no run can use; only the attributes `args` has are checked."""
    given = vars(args)
    for dest in POSITIVE:
        for v in _values(given.get(dest)):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 1:
                parser.error(f'{flag_of(parser, dest)} {v}: must be at least 1')
    for dest in NON_NEGATIVE:
        for v in _values(given.get(dest)):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                parser.error(f'{flag_of(parser, dest)} {v}: must not be negative')
    for dest in ('lr', 'smoothing', 'drop', 'drop_path', 'reprob', 'mixup', 'cutmix', 'mixup_prob'):
        v = given.get(dest)
        if isinstance(v, float) and not math.isfinite(v):
            parser.error(f'{flag_of(parser, dest)} {v}: must be a finite number')
    for dest in ('drop', 'drop_path', 'reprob', 'smoothing', 'mixup_prob', 'mixup_switch_prob',
                 'length_drop_ratio_bound'):
        v = given.get(dest)
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            parser.error(f'{flag_of(parser, dest)} {v}: must lie in [0, 1]')
    data_set = given.get('data_set')
    if data_set is not None and str(data_set).upper() not in known_data_sets():
        parser.error(f'unknown --data-set {data_set}; expected one of {", ".join(known_data_sets())}')
    size, patch = given.get('input_size'), patch_size_of(given.get('model'))
    if isinstance(size, int) and patch and size % patch:
        parser.error(f'{flag_of(parser, "input_size")} {size} is not a multiple of the patch size {patch} of '
                     f'--model {given.get("model")}; use e.g. {max(patch, size // patch * patch)}')


def check_train_batches(dataset_train, args, drop_last=True):
    """A training set smaller than one batch per process trains nothing when the last incomplete batch is dropped:
    say so (UserError naming --batch-size and the set's size) instead of running empty epochs."""
    from shared.distributed import get_world_size
    from shared.errors import UserError
    world = get_world_size()
    per_process = len(dataset_train) // world
    if drop_last and per_process < args.batch_size:
        where = f' ({per_process} per process over {world})' if world > 1 else ''
        raise UserError(f'--batch-size {args.batch_size} is larger than the training set of --data-set '
                        f'{args.data_set}: {len(dataset_train)} images{where}; an epoch would have no full batch. '
                        'Lower --batch-size or use a larger set')


def check_finite_weights(state_dict, source, flag=None):
    """Refuse weights holding NaN or Inf (UserError naming the file and the first such tensors): training or
    evaluating them only produces NaN."""
    from shared.checkpoint import nonfinite_tensors
    from shared.errors import UserError
    bad = nonfinite_tensors(state_dict)
    if bad:
        shown = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
        raise UserError(f'{flag + " " if flag else ""}{source}: non-finite (NaN/Inf) values in {shown}; '
                        'these weights are broken, refusing them')


def check_checkpoint_file(path, flag):
    """UserError naming `flag` when `path` is missing or is a text file (torch would report a bare KeyError)."""
    from shared.errors import UserError
    path = os.fspath(path)
    if str(path).startswith(('http://', 'https://')):
        return  # safe_load explains that nothing is downloaded
    if not os.path.isfile(path):
        raise UserError(f'{flag} {path}: no such file')
    with open(path, 'rb') as f:
        head = f.read(512)
    if head.startswith((b'PK\x03\x04', b'\x80', b'\x93NUMPY')):  # zip (torch, .npz), pickle, .npy
        return
    try:
        text = head.decode('utf-8')
    except UnicodeDecodeError:
        return
    if not head or all(c.isprintable() or c.isspace() for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ''
        raise UserError(f'{flag} {path}: a text file{f" (starting {first!r})" if first else " (empty)"}, not a '
                        'torch checkpoint; pass the .pth/.bin weights file')


def load_checkpoint(path, flag):
    """shared.checkpoint.safe_load after check_checkpoint_file; any other unreadable file becomes a UserError
    naming `flag` and the file."""
    from shared.checkpoint import CheckpointError, safe_load
    from shared.errors import UserError
    check_checkpoint_file(path, flag)
    try:
        return safe_load(path)
    except CheckpointError as e:  # safe_load reports unreadable, unsafe and non-checkpoint files alike
        raise UserError(f'{flag}: {e}') from None
