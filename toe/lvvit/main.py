"""ToE on LV-ViT with token labelling: `torchrun --nproc_per_node=N toe/lvvit/main.py DATA_DIR --model lvvit_s -b 256
--img-size 224 --drop-path 0.1 --token-label --token-label-data LABEL_DIR --token-label-size 14 --model-ema --apex-amp
--expansion-step 0 100 200 --keep-rate 0.4 0.7 1.0 --initialization-keep-rate 0.2 --expansion-multiple-stage 2`
(ToE/lvvit/main.py, TokenLabeling's timm train script).

DATA_DIR holds `train/<class>/*` and `validation/<class>/*` (`--train-split`, `--val-split`); LABEL_DIR the label
maps (toe/lvvit/data.py). Per epoch: stage from the epoch, reduction on, train; the online model is then validated
with the selector still on (the original never switches it off: reduced tokens in every stage but the last, with or
without --sparse-eval), the EMA copy on all tokens; with --model-ema the EMA metrics decide the best checkpoint.
Output: `<--output or ./output>/train/<YYYYmmdd-HHMMSS>-<model>-<img size>/` with args.yaml, summary.csv
(train_loss, train_total_train_time, eval_loss, eval_top1, eval_top5) and timm-saver checkpoints
(checkpoint-<epoch>.pth.tar, last.pth.tar, model_best.pth.tar) whose keys follow timm's saver.

Resume: each epoch's checkpoint, written after evaluation, also holds every rank's RNG states, the summary rows and
the saver's best metric and kept files. Rerunning the same command continues the newest run of this model and input
size under --output in its own folder (auto-resume; summary.csv rewritten from the stored rows, so each finished epoch
appears once) and ends bit-identical to an uninterrupted run; --no-auto-resume refuses such a folder instead.
`--resume FILE` loads FILE and starts a new run folder, as the original does. The output folder is locked against a
second live run, every file is written atomically, and a NaN/Inf loss or weight stops the run before anything is saved.
The eval split is labelled with the training split's class indices ('validation' falls back to 'val').

Differences from the original (toe/README.md): NVIDIA apex is replaced by torch.amp (`--apex-amp`, `--amp`,
`--native-amp` all mean torch autocast + GradScaler, on CUDA only); `--local_rank` and `--local-rank` are both
accepted and torchrun's LOCAL_RANK decides the device; `--sync-bn` uses torch's SyncBatchNorm (the original crashed);
there is no CUDA prefetcher (`--no-prefetcher` is the only path: random erasing runs in the data transform).
"""
import argparse
import csv
import glob
import io
import os
import time
from datetime import datetime

import torch
import yaml

from shared.amp import NativeScaler, autocast
from shared.checkpoint import (CheckpointError, all_rank_rng_states, atomic_copy, atomic_save, atomic_write_text,
                               load_finetune_state, load_weights, restore_rank_rng, safe_load, to_timm_state_dict)
from shared.datasets import DatasetLayoutError, image_folder
from shared.distributed import all_reduce_mean, init_distributed_mode, is_main_process, seed_per_rank, wrap_ddp
from shared.engine import build_model_ema, evaluate
from shared.errors import UserError, run_cli
from shared.rundir import RunDir
from shared.trainer import check_finite_loss, check_finite_weights
from toe.lvvit.data import (TokenLabelFolder, TokenLabelMixup, smoothed_one_hot, token_label_target,
                            token_label_train_transform)
from toe.lvvit.loss import TokenLabelCrossEntropy, TokenLabelSoftTargetCrossEntropy
from toe.lvvit.models import MODELS, create_model
from toe.token_select import add_toe_args, build_token_select, check_toe_args, enter_epoch

config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file specifying default arguments')


def get_args_parser():
    p = argparse.ArgumentParser(description='ToE LV-ViT (TokenLabeling) ImageNet training')
    a = p.add_argument
    a('data_dir', metavar='DIR', help='path to dataset (train/ and validation/ image folders)')
    a('--dataset', '-d', default='', help='dataset type (only image folders are read; kept for the original CLI)')
    a('--train-split', default='train')
    a('--val-split', default='validation', help="'validation' falls back to 'val' when absent (ImageNet layouts)")
    a('--model', default='lvvit', help=f'one of {sorted(MODELS)}')
    a('--pretrained', action='store_true', default=False)
    a('--initial-checkpoint', default='', help='initialise the model from this checkpoint')
    a('--resume', default='', help='resume model, optimizer, scaler and EMA from this checkpoint')
    a('--no-resume-opt', action='store_true', default=False)
    a('--auto-resume', action='store_true', default=True,
      help='continue the newest run of this model and input size under --output from its last.pth.tar (default)')
    a('--no-auto-resume', action='store_false', dest='auto_resume',
      help='start a new run; refused while --output holds a last.pth.tar of this model and input size')
    a('--num-classes', type=int, default=None)
    a('--gp', default=None, help='global pool type (unused by LV-ViT)')
    a('--img-size', type=int, default=None)
    a('--input-size', default=None, nargs=3, type=int, metavar='N N N')
    a('--crop-pct', default=None, type=float)
    a('--mean', type=float, nargs='+', default=None)
    a('--std', type=float, nargs='+', default=None)
    a('--interpolation', default='', type=str)
    a('-b', '--batch-size', type=int, default=32)
    a('-vb', '--validation-batch-size-multiplier', type=int, default=1)
    # optimizer
    a('--opt', default='adamw')
    a('--opt-eps', default=None, type=float)
    a('--opt-betas', default=None, type=float, nargs='+')
    a('--momentum', type=float, default=0.9)
    a('--weight-decay', type=float, default=0.05)
    a('--clip-grad', type=float, default=None)
    a('--clip-mode', type=str, default='norm', choices=['norm', 'value', 'agc'])
    # schedule
    a('--sched', default='cosine')
    a('--lr', type=float, default=1.6e-3, help='not rescaled by batch size')
    a('--lr-noise', type=float, nargs='+', default=None)
    a('--lr-noise-pct', type=float, default=0.67)
    a('--lr-noise-std', type=float, default=1.0)
    a('--lr-cycle-mul', type=float, default=1.0)
    a('--lr-cycle-limit', type=int, default=1)
    a('--warmup-lr', type=float, default=1e-6)
    a('--min-lr', type=float, default=1e-5)
    a('--epochs', type=int, default=300)
    a('--start-epoch', default=None, type=int)
    a('--decay-epochs', type=float, default=30)
    a('--warmup-epochs', type=int, default=5)
    a('--cooldown-epochs', type=int, default=10, help='trained after --epochs at min lr (timm: epochs + cooldown)')
    a('--patience-epochs', type=int, default=10)
    a('--decay-rate', '--dr', type=float, default=0.1)
    # augmentation
    a('--no-aug', action='store_true', default=False)
    a('--scale', type=float, nargs='+', default=[0.08, 1.0])
    a('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.])
    a('--hflip', type=float, default=0.5)
    a('--vflip', type=float, default=0.)
    a('--color-jitter', type=float, default=0.4)
    a('--aa', type=str, default='rand-m9-mstd0.5-inc1')
    a('--aug-splits', type=int, default=0)
    a('--jsd', action='store_true', default=False)
    a('--reprob', type=float, default=0.25)
    a('--remode', type=str, default='pixel')
    a('--recount', type=int, default=1)
    a('--resplit', action='store_true', default=False)
    a('--mixup', type=float, default=0.0)
    a('--cutmix', type=float, default=0.0)
    a('--cutmix-minmax', type=float, nargs='+', default=None)
    a('--mixup-prob', type=float, default=1.0)
    a('--mixup-switch-prob', type=float, default=0.5)
    a('--mixup-mode', type=str, default='batch')
    a('--mixup-off-epoch', default=0, type=int)
    a('--smoothing', type=float, default=0.1)
    a('--train-interpolation', type=str, default='random')
    a('--drop', type=float, default=0.0)
    a('--drop-connect', type=float, default=None, help='deprecated alias of --drop-path')
    a('--drop-path', type=float, default=None)
    a('--drop-block', type=float, default=None)
    a('--bn-tf', action='store_true', default=False, help='parsed and unused, as in the original')
    a('--bn-momentum', type=float, default=None)
    a('--bn-eps', type=float, default=None)
    a('--sync-bn', action='store_true', help="torch SyncBatchNorm for the stem's BatchNorms")
    a('--dist-bn', type=str, default='', choices=['', 'broadcast', 'reduce'])
    # EMA
    a('--model-ema', action='store_true', default=False)
    a('--model-ema-force-cpu', action='store_true', default=False)
    a('--model-ema-decay', type=float, default=0.99992)
    # misc
    a('--seed', type=int, default=42)
    a('--log-interval', type=int, default=50)
    a('--recovery-interval', type=int, default=0)
    a('--checkpoint-hist', type=int, default=10)
    a('-j', '--workers', type=int, default=8)
    a('--save-images', action='store_true', default=False, help='parsed and unused')
    a('--amp', action='store_true', default=False)
    a('--apex-amp', action='store_true', default=False, help='accepted: torch.amp is used instead of NVIDIA apex')
    a('--native-amp', action='store_true', default=False)
    a('--channels-last', action='store_true', default=False)
    a('--pin-mem', action='store_true', default=False)
    a('--no-prefetcher', action='store_true', default=False, help='accepted: there is no CUDA prefetcher here')
    a('--output', default='', type=str)
    a('--eval-metric', default='top1', type=str, choices=['top1', 'top5', 'loss'])
    a('--tta', type=int, default=0, help='parsed and unused (as in the original train script)')
    a('--local_rank', '--local-rank', dest='local_rank', default=0, type=int,
      help='set by torch.distributed.launch (either spelling); torchrun sets LOCAL_RANK instead')
    a('--use-multi-epochs-loader', action='store_true', default=False, help='parsed and unused')
    a('--torchscript', dest='torchscript', action='store_true')
    a('--device', default='cuda', help='cuda (per-rank GPU under torchrun) or cpu; falls back to the CPU')
    # token labelling
    a('--token-label', action='store_true', default=False)
    a('--token-label-data', type=str, default='', metavar='DIR')
    a('--token-label-size', type=int, default=1)
    a('--dense-weight', type=float, default=1.0)
    a('--cls-weight', type=float, default=1.0)
    a('--ground-truth', action='store_true', default=False)
    a('--finetune', default='', type=str, metavar='PATH')
    add_toe_args(p, initialization_keep_rate=0.25, expansion_multiple_stage=2)
    return p


def parse_args(argv=None):
    args_config, remaining = config_parser.parse_known_args(argv)
    parser = get_args_parser()
    if args_config.config:
        with open(args_config.config) as f:
            parser.set_defaults(**yaml.safe_load(f))
    args = parser.parse_args(remaining)
    check_toe_args(parser, args)
    for flag, value in (('--epochs', args.epochs), ('-b/--batch-size', args.batch_size)):
        if value < 1:  # timm's scheduler would stop on a bare assertion, an empty batch deeper still
            parser.error(f'{flag} {value}: must be at least 1')
    if args.model not in MODELS:
        parser.error(f'--model {args.model!r}: ToE LV-ViT models are {sorted(MODELS)}')
    if args.token_label and args.token_label_size > 1 and args.model == 'lvvit':
        parser.error('--token-label-size > 1 needs a model with the dense head (lvvit_t, lvvit_s, lvvit_m)')
    if args.token_label and args.token_label_size == 1 and args.model != 'lvvit':
        parser.error(f'--token-label-size 1 scores only a class output; {args.model} trains with the dense head: pass '
                     '--token-label-size N with N*N = its patch tokens (14 at 224 px; the original crashes here)')
    if args.token_label_data and not args.token_label:
        parser.error('--token-label-data is read only with --token-label')
    if (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None) and args.batch_size % 2:
        parser.error(f'--mixup/--cutmix pair each image with the flipped batch: -b {args.batch_size} must be even')
    if args.aug_splits or args.jsd:
        parser.error('--aug-splits/--jsd (AugMix) are not implemented here')
    if args.torchscript:
        parser.error('--torchscript: the ToE block loop cannot be scripted')
    args.config = args_config.config
    return args, yaml.safe_dump(args.__dict__, default_flow_style=False)


def load_finetune(model, path, use_ema, num_classes):
    """TokenLabeling's load_pretrained_weights: EMA weights when asked and present, heads of another size dropped,
    a position embedding of another grid resized, the rest loaded non-strictly."""
    obj = safe_load(path)
    if isinstance(obj, dict) and use_ema and 'state_dict_ema' in obj:
        state = obj['state_dict_ema']
    elif isinstance(obj, dict) and 'state_dict' in obj:
        state = obj['state_dict']
    else:
        state = to_timm_state_dict(obj)
    state = {k[7:] if k.startswith('module.') else k: v for k, v in state.items()}
    return load_finetune_state(model, state, f'--finetune {path}',
                               head_keys=('head.weight', 'head.bias', 'aux_head.weight', 'aux_head.bias'))


LAST = 'last.pth.tar'
BEST = 'model_best.pth.tar'
SUMMARY = 'summary.csv'


class Saver:
    """timm's CheckpointSaver file names and keys (epoch, arch, state_dict, optimizer, version, args, amp_scaler,
    state_dict_ema, metric), written atomically on rank 0.

    Each epoch's state also carries what a restart needs to continue exactly (`extra`: every rank's RNG states and
    the summary rows) and the saver's own bookkeeping (`saver`: the best metric and the kept numbered checkpoints).
    last.pth.tar is written after checkpoint-<epoch> and model_best: it is the commit point a restart continues
    from, and an epoch redone after a kill rewrites the other two with the same content."""

    def __init__(self, model, optimizer, args, model_ema, loss_scaler, checkpoint_dir, decreasing, max_history):
        self.model, self.optimizer, self.args, self.model_ema = model, optimizer, args, model_ema
        self.loss_scaler, self.dir, self.decreasing, self.max_history = loss_scaler, checkpoint_dir, decreasing, \
            max_history
        self.kept = []  # (file name, metric) of the numbered checkpoints on disk, best first
        self.best_metric = self.best_epoch = None

    def bookkeeping(self):
        return {'best_metric': self.best_metric, 'best_epoch': self.best_epoch, 'kept': [list(k) for k in self.kept]}

    def restore(self, saved):
        """Continue the bookkeeping of the run whose folder this is (from its last.pth.tar)."""
        self.best_metric, self.best_epoch = saved['best_metric'], saved['best_epoch']
        self.kept = [tuple(k) for k in saved['kept']]

    def _state(self, epoch, metric=None, extra=None):
        from shared.distributed import unwrap_model
        state = {'epoch': epoch, 'arch': self.args.model, 'state_dict': unwrap_model(self.model).state_dict(),
                 'optimizer': self.optimizer.state_dict(), 'version': 2, 'args': self.args}
        if self.loss_scaler is not None:
            state['amp_scaler'] = self.loss_scaler.state_dict()
        if self.model_ema is not None:
            state['state_dict_ema'] = self.model_ema.module.state_dict()
        if metric is not None:
            state['metric'] = metric
        state.update(extra or {})
        return state

    def _better(self, a, b):
        return b is None or (a < b if self.decreasing else a > b)

    def _rank(self, entry):
        return -entry[1] if not self.decreasing else entry[1]

    def save_checkpoint(self, epoch, metric, extra=None):
        numbered = f'checkpoint-{epoch}.pth.tar'
        # a stable sort: among equal metrics the older checkpoint stays
        ranked = sorted(self.kept + [(numbered, metric)], key=self._rank) if self.max_history > 0 else []
        self.kept, dropped = ranked[:self.max_history], [name for name, _ in ranked[self.max_history:]]
        improved = self._better(metric, self.best_metric)
        if improved:
            self.best_metric, self.best_epoch = metric, epoch
        state = self._state(epoch, metric, {**(extra or {}), 'saver': self.bookkeeping()})
        files = [numbered] if self.max_history > 0 and numbered not in dropped else []
        files += [BEST] if improved else []
        written = os.path.join(self.dir, (files + [LAST])[0])
        atomic_save(state, written)
        for name in files[1:]:
            atomic_copy(written, os.path.join(self.dir, name))
        for name in dropped:
            if os.path.exists(os.path.join(self.dir, name)):
                os.remove(os.path.join(self.dir, name))
        if files:
            atomic_copy(written, os.path.join(self.dir, LAST))
        return self.best_metric, self.best_epoch

    def save_recovery(self, epoch, batch_idx):
        for old in glob.glob(os.path.join(glob.escape(self.dir), 'recovery-*.pth.tar')):
            os.remove(old)
        atomic_save(self._state(epoch), os.path.join(self.dir, f'recovery-{epoch}-{batch_idx}.pth.tar'))


def summary_text(rows):
    """summary.csv as timm's update_summary leaves it after appending `rows` one by one (csv module, header from
    the first row, '\\r\\n' line ends)."""
    if not rows:
        return ''
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def summary_row(epoch, train_metrics, eval_metrics):
    return {'epoch': epoch, **{f'train_{k}': v for k, v in train_metrics.items()},
            **{f'eval_{k}': v for k, v in eval_metrics.items()}}


def saved_runs(args, img_size):
    """last.pth.tar of this model's earlier runs at this input size under <--output>/train/, oldest save first."""
    base = os.path.join(args.output or './output', 'train')
    pattern = os.path.join(glob.escape(base), f'*-{glob.escape(args.model)}-{img_size}', LAST)
    return sorted(glob.glob(pattern), key=os.path.getmtime)


def choose_resume(args, img_size):
    """(checkpoint to load or '', run folder to keep writing into or ''). --resume loads the given file and starts a
    new run folder, as the original does; without it the newest earlier run of this model and size is continued in
    its own folder (auto-resume), or, with --no-auto-resume, refused."""
    if args.resume:
        return args.resume, ''
    saved = saved_runs(args, img_size)
    if not saved:
        return '', ''
    if not args.auto_resume:
        raise UserError(f'{saved[-1]} holds an earlier run of {args.model} at {img_size} px and auto-resume is off: '
                        'continue it by rerunning without --no-auto-resume, or pass another --output')
    print(f'| auto-resume from {saved[-1]}')
    return saved[-1], os.path.dirname(saved[-1])


def agree_on_resume(args, img_size):
    """choose_resume on rank 0, told to every rank (they may not share a view of the folder, and must all load the
    same file or all stop with the same error)."""
    if not args.distributed:
        return choose_resume(args, img_size)
    message = [None]
    if is_main_process():
        try:
            message = [choose_resume(args, img_size)]
        except UserError as e:
            message = [str(e)]
    torch.distributed.broadcast_object_list(message, src=0)
    if isinstance(message[0], str):
        raise UserError(message[0])
    return message[0]


def resume_checkpoint(model, path, optimizer=None, loss_scaler=None):
    """timm's resume_checkpoint: weights (+ optimizer, scaler). Returns (epoch to start at, the checkpoint dict)."""
    try:
        obj = safe_load(path)
    except (OSError, CheckpointError) as e:
        raise UserError(f'--resume {path}: {e}') from None
    if not (isinstance(obj, dict) and 'state_dict' in obj):
        raise UserError(f'--resume {path}: not a training checkpoint of this script (no state_dict key)')
    try:
        load_weights(model, {k[7:] if k.startswith('module.') else k: v for k, v in obj['state_dict'].items()},
                     source=path)
    except CheckpointError as e:
        raise UserError(f'--resume {path}: {e}') from None
    if optimizer is not None and 'optimizer' in obj:
        optimizer.load_state_dict(obj['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in obj:
        loss_scaler.load_state_dict(obj[loss_scaler.state_dict_key])
    epoch = obj.get('epoch')
    print(f"| resumed {path} (epoch {epoch})")
    return (None if epoch is None else epoch + 1 if obj.get('version', 1) > 1 else epoch), obj


def eval_dir(args):
    """<data_dir>/<--val-split>; for the default 'validation', <data_dir>/val when only that exists (as timm's
    folder search does for ImageNet)."""
    path = os.path.join(args.data_dir, args.val_split)
    fallback = os.path.join(args.data_dir, 'val')
    if args.val_split == 'validation' and not os.path.isdir(path) and os.path.isdir(fallback):
        return fallback
    return path


def build_loaders(args, data_config):
    from timm.data import create_transform
    train_dir = os.path.join(args.data_dir, args.train_split)
    interpolation = args.train_interpolation
    if args.no_aug or not interpolation:
        interpolation = data_config['interpolation']
    if args.token_label and args.token_label_data:
        transform = token_label_train_transform(
            data_config['input_size'], scale=args.scale, ratio=args.ratio, hflip=0. if args.no_aug else args.hflip,
            vflip=0. if args.no_aug else args.vflip, color_jitter=args.color_jitter,
            auto_augment=None if args.no_aug else args.aa, interpolation=interpolation, mean=data_config['mean'],
            std=data_config['std'], re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
        dataset_train = TokenLabelFolder(train_dir, args.token_label_data, transform)
    else:
        transform = create_transform(
            data_config['input_size'], is_training=True, no_aug=args.no_aug, scale=args.scale, ratio=args.ratio,
            hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa or None,
            interpolation=interpolation, mean=data_config['mean'], std=data_config['std'], re_prob=args.reprob,
            re_mode=args.remode, re_count=args.recount)
        dataset_train = image_folder(train_dir, transform)
    eval_transform = create_transform(
        data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'])
    # labelled with the training split's class indices: a class missing from the eval folder shifts no label
    dataset_eval = image_folder(eval_dir(args), eval_transform, train_root=train_dir)
    if args.distributed:
        sampler_train = torch.utils.data.DistributedSampler(dataset_train)
        sampler_eval = torch.utils.data.DistributedSampler(dataset_eval, shuffle=False)
    else:
        sampler_train = torch.utils.data.RandomSampler(dataset_train)
        sampler_eval = torch.utils.data.SequentialSampler(dataset_eval)
    loader_train = torch.utils.data.DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                                               num_workers=args.workers, pin_memory=args.pin_mem, drop_last=True)
    loader_eval = torch.utils.data.DataLoader(dataset_eval, sampler=sampler_eval,
                                              batch_size=args.validation_batch_size_multiplier * args.batch_size,
                                              num_workers=args.workers, pin_memory=args.pin_mem)
    if len(loader_train) == 0:
        raise DatasetLayoutError(f'{train_dir}: {len(dataset_train)} images per {args.world_size} process(es) is less '
                                 f'than one batch of {args.batch_size}')
    return loader_train, loader_eval


def build_token_label_mixup(args):
    """TokenLabeling's mixup/cutmix, or None when neither is asked for."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return TokenLabelMixup(label_size=args.token_label_size if args.token_label and args.token_label_data else 1,
                           mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                           prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                           label_smoothing=args.smoothing, num_classes=args.num_classes)


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, device, lr_scheduler=None, saver=None,
                    amp=False, loss_scaler=None, model_ema=None, mixup_fn=None):
    """timm train-script epoch; `total_train_time` = sum of forward + loss + backward + step (+ EMA) seconds."""
    if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        mixup_fn.mixup_enabled = False  # lambda 1 from here on: the same targets as without mixup
    from timm.utils import AverageMeter, dispatch_clip_grad
    losses_m, batch_time_m = AverageMeter(), AverageMeter()
    total_train_time = 0.0
    steps = len(loader)
    model.train()
    batch_start = time.time()
    for batch_idx, (inputs, target) in enumerate(loader):
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if mixup_fn is not None:
            inputs, target = mixup_fn(inputs, target)
        else:
            if args.token_label and args.token_label_data:
                target = token_label_target(target, args.num_classes, args.smoothing, args.token_label_size)
            if target.dim() == 1:
                target = smoothed_one_hot(target, args.num_classes, args.smoothing)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        start = time.time()
        with autocast(device, amp):
            output = model(inputs)
            loss = loss_fn(output, target)
        loss_value = loss.item()
        check_finite_loss(loss_value, epoch, step=batch_idx)
        optimizer.zero_grad()
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                        parameters=model.parameters())
        else:
            loss.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        if model_ema is not None:
            model_ema.update(model)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        total_train_time += time.time() - start
        losses_m.update(all_reduce_mean(loss_value) if args.distributed else loss_value, inputs.size(0))
        batch_time_m.update(time.time() - batch_start)
        if batch_idx % args.log_interval == 0 or batch_idx + 1 == steps:
            lr = sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups)
            print(f'Train: {epoch} [{batch_idx:>4d}/{steps} ({100. * batch_idx / max(steps - 1, 1):>3.0f}%)]  '
                  f'Loss: {losses_m.val:#.4g} ({losses_m.avg:#.3g})  Time: {batch_time_m.val:.3f}s  LR: {lr:.3e}')
        if saver is not None and args.recovery_interval and (batch_idx + 1) % args.recovery_interval == 0:
            check_finite_weights(model)
            saver.save_recovery(epoch, batch_idx)
        if lr_scheduler is not None:
            # timm counts optimizer updates from the start of the run
            lr_scheduler.step_update(num_updates=epoch * steps + batch_idx + 1, metric=losses_m.avg)
        batch_start = time.time()
    return {'loss': losses_m.avg, 'total_train_time': total_train_time}


def validate(model, loader, device, amp, suffix=''):
    stats = evaluate(loader, model, device, amp=amp, print_freq=10 ** 9, header=f'Test{suffix}:')
    return {'loss': stats['loss'], 'top1': stats['acc1'], 'top5': stats['acc5']}


def main(args, args_text=''):
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer
    from timm.scheduler import create_scheduler
    from timm.utils import distribute_bn
    init_distributed_mode(args)
    device = torch.device(args.device)
    use_amp = args.amp or args.apex_amp or args.native_amp
    amp = use_amp and device.type == 'cuda'
    if args.apex_amp:
        print('| --apex-amp: NVIDIA apex O1 is replaced by torch.amp (float16 autocast + GradScaler)')
    if use_amp and not amp:
        print('| AMP asked for but running on the CPU: training in float32')
    seed_per_rank(args.seed, python_random=True)  # RandAugment draws from python's random

    model = create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes, drop_rate=args.drop,
                         drop_path_rate=args.drop_path if args.drop_path is not None else args.drop_connect,
                         img_size=args.img_size)
    model.token_select = build_token_select(args)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.initial_checkpoint:
        obj = safe_load(args.initial_checkpoint)
        state = obj.get('state_dict', obj) if isinstance(obj, dict) else obj
        load_weights(model, to_timm_state_dict(state), source=args.initial_checkpoint)
    if args.finetune:
        load_finetune(model, args.finetune, args.model_ema, args.num_classes)
    print(f'Model {args.model} created, param count: {sum(p.numel() for p in model.parameters())}')
    data_config = resolve_data_config(vars(args), model=model, verbose=is_main_process())
    img_size = data_config['input_size'][-1]
    token_select, num_patches = model.token_select, model.patch_embed.num_patches
    try:
        token_select.check_num_patches(num_patches)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.token_label and args.token_label_size > 1 and args.token_label_size ** 2 != num_patches:
        raise UserError(f'--token-label-size {args.token_label_size} gives {args.token_label_size ** 2} token labels '
                        f'but {args.model} at {img_size} px has {num_patches} patch tokens '
                        f'(use {int(num_patches ** 0.5)})')

    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = create_optimizer(args, model)
    loss_scaler = NativeScaler(device) if amp else None

    resume_path, continued_dir = agree_on_resume(args, img_size)
    resume_epoch = checkpoint = None
    if resume_path:
        resume_epoch, checkpoint = resume_checkpoint(model, resume_path, None if args.no_resume_opt else optimizer,
                                                     None if args.no_resume_opt else loss_scaler)
    # a continuation of the saved run: its RNG states, summary rows and (in its own folder) best and kept files
    continuing = checkpoint is not None and not args.no_resume_opt and args.start_epoch is None
    model_ema = build_model_ema(model, args)  # a copy with the selector's flag off: validated on all tokens
    if model_ema is not None and checkpoint is not None and 'state_dict_ema' in checkpoint:
        load_weights(model_ema.module, checkpoint['state_dict_ema'], source=f'{resume_path} (state_dict_ema)')
    ema_resumed = model_ema is not None and checkpoint is not None and 'state_dict_ema' in checkpoint
    # a fresh EMA starts from the broadcast weights on every rank; a resumed one already holds the saved weights
    model, model_without_ddp = wrap_ddp(model, args, model_ema=None if ema_resumed else model_ema)

    lr_scheduler, num_epochs = create_scheduler(args, optimizer)
    start_epoch = args.start_epoch if args.start_epoch is not None else resume_epoch or 0
    if lr_scheduler is not None and start_epoch > 0:
        lr_scheduler.step(start_epoch)
    print(f'Scheduled epochs: {num_epochs}')

    loader_train, loader_eval = build_loaders(args, data_config)
    if args.token_label and args.token_label_size == 1:
        train_loss_fn = TokenLabelSoftTargetCrossEntropy()
    elif args.token_label:
        train_loss_fn = TokenLabelCrossEntropy(dense_weight=args.dense_weight, cls_weight=args.cls_weight,
                                               mixup_active=False, classes=args.num_classes,
                                               ground_truth=args.ground_truth)
    else:
        from timm.loss import SoftTargetCrossEntropy
        train_loss_fn = SoftTargetCrossEntropy()
    if not args.token_label and getattr(model_without_ddp, 'return_dense', False):
        raise UserError(f'{args.model} trains with the dense head: pass --token-label (as the original needs)')

    rows = [r for r in checkpoint.get('summary', []) if r['epoch'] < start_epoch] if continuing else []
    saver, output_dir = None, ''
    if is_main_process():
        exp_name = '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), args.model, str(img_size)])
        output_dir = continued_dir or os.path.join(args.output or './output', 'train', exp_name)
    run_dir = RunDir(output_dir, active=is_main_process())
    run_dir.acquire()
    try:
        if is_main_process():
            saver = Saver(model_without_ddp, optimizer, args, model_ema, loss_scaler, output_dir,
                          decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist)
            if continuing and continued_dir and 'saver' in checkpoint:
                saver.restore(checkpoint['saver'])
            atomic_write_text(args_text, os.path.join(output_dir, 'args.yaml'))
            if rows or continued_dir:  # lines of epochs after the checkpoint (a kill in between) are dropped
                atomic_write_text(summary_text(rows), os.path.join(output_dir, SUMMARY))
            print(f'| output: {output_dir}')

        if args.finetune:
            validate(model, loader_eval, device, amp)
        mixup_fn = build_token_label_mixup(args)
        if continuing:
            # after everything that draws at start-up: the first epoch draws what the saved run's next epoch drew
            restore_rank_rng(checkpoint.get('rng'), resume_path)
        best_metric = best_epoch = None
        for epoch in range(start_epoch, num_epochs):
            if args.distributed:
                loader_train.sampler.set_epoch(epoch)
            enter_epoch(token_select, epoch, num_patches)
            train_metrics = train_one_epoch(epoch, model, loader_train, optimizer, train_loss_fn, args, device,
                                            lr_scheduler=lr_scheduler, saver=saver, amp=amp, loss_scaler=loss_scaler,
                                            model_ema=model_ema, mixup_fn=mixup_fn)
            print(f"total_train_time (forward+backward+step, this epoch, this rank): "
                  f"{train_metrics['total_train_time']:.3f} s")
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
            # The original never switches the online selector off here (its --sparse-eval branch sets it on, or
            # writes a dead attribute): the online model is validated on the training stage's tokens.
            eval_metrics = validate(model, loader_eval, device, amp)
            if model_ema is not None and not args.model_ema_force_cpu:
                model_ema.module.token_select.update_current_stage(epoch)  # its flag stays off: all tokens
                if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                    distribute_bn(model_ema, args.world_size, args.dist_bn == 'reduce')
                eval_metrics = validate(model_ema.module, loader_eval, device, amp, suffix=' (EMA)')
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
            rows.append(summary_row(epoch, train_metrics, eval_metrics))
            check_finite_weights(model)
            if model_ema is not None:
                check_finite_weights(model_ema.module, 'EMA model')
            # after evaluation, whose loader draws from torch's generator: a restart continues with the same draws
            rng = all_rank_rng_states()
            if saver is not None:
                best_metric, best_epoch = saver.save_checkpoint(epoch, eval_metrics[args.eval_metric],
                                                                extra={'rng': rng, 'summary': list(rows)})
                atomic_write_text(summary_text(rows), os.path.join(output_dir, SUMMARY))
    finally:
        run_dir.release()
    if best_metric is not None:
        print(f'*** Best metric: {best_metric} (epoch {best_epoch})')
    return output_dir


if __name__ == '__main__':
    run_cli(main, *parse_args())
