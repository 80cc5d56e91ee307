"""ToE inside EfficientTrain's ConvNeXt-style trainer (ToE/EfficientTrain/main.py), run chunk by chunk by
ET_training.py: `torchrun --nproc_per_node=N toe/EfficientTrain/main.py --model deit_small_patch16_224 --drop_path 0.1
--batch_size 512 --lr 4e-3 --update_freq 1 --data_path DATA --output_dir OUT --epochs 300 --warmup_epochs 20
--end_epoch 60 --input_size 160 --aa rand-m1-mstd0.5-inc1 --use_amp true --clip_grad 5.0 --expansion-step 0 100 200
--keep-rate 0.6 0.8 1.0 --initialization-keep-rate 0.3 --expansion-multiple-stage 2`.

Images are loaded at --base_input_size; when --input_size is smaller each batch is low-passed in the Fourier domain
(`freq_crop`) to --input_size, for training and evaluation; the DeiT is built for --input_size (10x10/12x12/14x14 grids
at 160/192/224), so ToE sees N = 100/144/196. LR and weight decay follow per-iteration cosine schedules over --epochs,
the loop stops at --end_epoch, gradients accumulate over --update_freq. Auto-resume takes the highest
`checkpoint-<n>.pth` of --output_dir and, when the grid changed between chunks, resizes `pos_embed` and its Adam
moments bilinearly (update_ckpt). Only the DeiT models (the ones ET_training.py gives ToE settings) are built here.

Checkpoints are written after evaluation and hold every rank's RNG states, the best accuracies and the log history: a
run killed inside a chunk and restarted continues bit-identical to an uninterrupted one (log.txt restored from the
checkpoint), while a new chunk starts from fresh seeds and bests as the original's chunks do. `--auto_resume false`
refuses an output dir that already holds a numbered checkpoint. A NaN/Inf loss or weight stops before any save.
"""
import argparse
import datetime
import glob
import math
import os
import time

import numpy as np
import torch

from shared.amp import NativeScaler, autocast
from shared.args import str2bool
from shared.checkpoint import (CheckpointError, atomic_save, load_weights, safe_load, save_checkpoint, set_rng_state,
                               to_timm_state_dict)
from shared.datasets import DatasetLayoutError, build_dataset
from shared.distributed import (all_reduce_mean, get_rank, get_world_size, init_distributed_mode, is_main_process,
                                seed_per_rank, wrap_ddp)
from shared.engine import build_mixup, build_model_ema, evaluate
from shared.errors import UserError, run_cli
from shared.metrics import MetricLogger, SmoothedValue
from shared.rundir import RunDir
from shared.trainer import check_finite_loss, check_finite_weights
from toe.deit.models import ARCHS, create_model
from toe.token_select import add_toe_args, build_token_select, check_toe_args, enter_epoch


def get_args_parser():
    p = argparse.ArgumentParser('ToE EfficientTrain training and evaluation script', add_help=True)
    a = p.add_argument
    a('--batch_size', default=64, type=int, help='per-process batch size')
    a('--epochs', default=300, type=int, help='length of the LR / WD schedules')
    a('--update_freq', default=1, type=int, help='gradient accumulation steps')
    a('--end_epoch', default=300, type=int, help='EfficientTrain: this chunk stops before this epoch')
    a('--base_input_size', default=224, type=int, help='EfficientTrain: size images are loaded at')
    a('--model', default='deit_small_patch16_224', type=str)
    a('--drop_path', type=float, default=0)
    a('--input_size', default=224, type=int, help='size the model is built for (freq_crop below base_input_size)')
    a('--layer_scale_init_value', default=1e-6, type=float, help='ConvNeXt only (parsed, unused for DeiT)')
    a('--model_ema', type=str2bool, default=False)
    a('--model_ema_decay', type=float, default=0.9999)
    a('--model_ema_force_cpu', type=str2bool, default=False)
    a('--model_ema_eval', type=str2bool, default=False)
    a('--opt', default='adamw', type=str)
    a('--opt_eps', default=1e-8, type=float)
    a('--opt_betas', default=None, type=float, nargs='+')
    a('--clip_grad', type=float, default=None)
    a('--momentum', type=float, default=0.9)
    a('--weight_decay', type=float, default=0.05)
    a('--weight_decay_end', type=float, default=None)
    a('--lr', type=float, default=4e-3)
    a('--layer_decay', type=float, default=1.0, help='ConvNeXt only (parsed, unused for DeiT)')
    a('--min_lr', type=float, default=1e-6)
    a('--warmup_epochs', type=int, default=20)
    a('--warmup_steps', type=int, default=-1)
    a('--color_jitter', type=float, default=0.4)
    a('--aa', type=str, default='rand-m9-mstd0.5-inc1')
    a('--smoothing', type=float, default=0.1)
    a('--train_interpolation', type=str, default='bicubic')
    a('--crop_pct', type=float, default=None)
    a('--reprob', type=float, default=0.25)
    a('--remode', type=str, default='pixel')
    a('--recount', type=int, default=1)
    a('--resplit', type=str2bool, default=False)
    a('--mixup', type=float, default=0.8)
    a('--cutmix', type=float, default=1.0)
    a('--cutmix_minmax', type=float, nargs='+', default=None)
    a('--mixup_prob', type=float, default=1.0)
    a('--mixup_switch_prob', type=float, default=0.5)
    a('--mixup_mode', type=str, default='batch')
    a('--finetune', default='')
    a('--head_init_scale', default=1.0, type=float)
    a('--model_key', default='model|module', type=str)
    a('--model_prefix', default='', type=str)
    a('--data_path', default='/datasets01/imagenet_full_size/061417/', type=str)
    a('--eval_data_path', default=None, type=str)
    a('--nb_classes', default=1000, type=int)
    a('--imagenet_default_mean_and_std', type=str2bool, default=True)
    a('--data_set', default='IMNET', choices=['CIFAR', 'IMNET', 'image_folder', 'DIGITS', 'FAKE'])
    a('--output_dir', default='')
    a('--log_dir', default=None)
    a('--device', default='cuda')
    a('--seed', default=0, type=int)
    a('--resume', default='')
    a('--auto_resume', type=str2bool, default=True)
    a('--save_ckpt', type=str2bool, default=True)
    a('--save_ckpt_freq', default=1, type=int)
    a('--save_ckpt_num', default=3, type=int)
    a('--start_epoch', default=0, type=int)
    a('--eval', type=str2bool, default=False)
    a('--dist_eval', type=str2bool, default=True)
    a('--disable_eval', type=str2bool, default=False)
    a('--num_workers', default=10, type=int)
    a('--pin_mem', type=str2bool, default=True)
    a('--world_size', default=1, type=int)
    a('--local_rank', '--local-rank', dest='local_rank', default=-1, type=int)
    a('--dist_on_itp', type=str2bool, default=False)
    a('--dist_url', default='env://')
    a('--use_amp', type=str2bool, default=False)
    a('--enable_wandb', type=str2bool, default=False, help='parsed; W&B logging is not wired here')
    a('--project', default='convnext', type=str)
    a('--wandb_ckpt', type=str2bool, default=False)
    add_toe_args(p, initialization_keep_rate=0.25, expansion_multiple_stage=2)
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_toe_args(parser, args)
    for flag in ('epochs', 'batch_size'):  # checked before the data is looked for
        if getattr(args, flag) < 1:
            parser.error(f'--{flag} {getattr(args, flag)}: must be at least 1')
    if args.model not in ARCHS:
        parser.error(f'--model {args.model!r}: this port builds the DeiT models ET_training.py trains with ToE '
                     f'({", ".join(m for m in ARCHS if m.startswith("deit_"))} and the digits ViT)')
    if args.input_size > args.base_input_size:
        parser.error(f'--input_size {args.input_size} is above --base_input_size {args.base_input_size}')
    if args.update_freq < 1:
        parser.error('--update_freq must be >= 1')
    return args


def freq_crop(images, band_width):
    """EfficientTrain's low-pass: keep the band_width x band_width lowest frequencies of the 2-D FFT (the four corners
    of the unshifted spectrum), rescale by (band / size)^2, inverse FFT, real part -> (B, C, band, band)."""
    size, half = images.shape[-1], band_width // 2
    spectrum = torch.fft.fft2(images)
    crop = torch.empty(images.shape[0], images.shape[1], 2 * half, 2 * half, dtype=spectrum.dtype,
                       device=spectrum.device)
    crop[:, :, :half, :half] = spectrum[:, :, :half, :half]
    crop[:, :, -half:, :half] = spectrum[:, :, -half:, :half]
    crop[:, :, :half, -half:] = spectrum[:, :, :half, -half:]
    crop[:, :, -half:, -half:] = spectrum[:, :, -half:, -half:]
    return torch.real(torch.fft.ifft2(crop * ((half * 2 / size) ** 2)))


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0,
                     warmup_steps=-1):
    """Per-iteration linear warm-up then cosine (ConvNeXt's utils.cosine_scheduler)."""
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def update_ckpt(checkpoint, model):
    """Resize `pos_embed` (and Adam's exp_avg / exp_avg_sq of it) bilinearly to the model's grid (input_size / 16
    for the DeiTs, as the original computes it)."""
    new_side = int(math.isqrt(model.patch_embed.num_patches))
    old_len = checkpoint['model']['pos_embed'].shape[1]
    for key in ('model', 'model_ema'):
        state = checkpoint.get(key)
        if state is None or 'pos_embed' not in state:
            continue
        state['pos_embed'] = _resize(state['pos_embed'], new_side)
    opt = checkpoint.get('optimizer')
    if opt:
        dim = model.pos_embed.shape[-1]
        for st in opt['state'].values():
            for kk in ('exp_avg', 'exp_avg_sq'):
                t = st.get(kk)
                if t is not None and t.dim() == 3 and t.shape[0] == 1 and t.shape[1] == old_len and t.shape[2] == dim:
                    st[kk] = _resize(t, new_side)
    return checkpoint


def _resize(pos_embed, new_side):
    side = int(math.isqrt(pos_embed.shape[1] - 1))
    if side == new_side:
        return pos_embed
    print(f'bilinear interpolate & load: pos_embed {side}x{side} -> {new_side}x{new_side}')
    grid = pos_embed[:, 1:].transpose(1, 2).reshape(1, -1, side, side)
    grid = torch.nn.functional.interpolate(grid, size=(new_side, new_side), mode='bilinear', align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


def latest_numbered_checkpoint(output_dir):
    numbered = [int(p.rsplit('-', 1)[1][:-4]) for p in glob.glob(os.path.join(output_dir, 'checkpoint-*.pth'))
                if p.rsplit('-', 1)[1][:-4].isdigit()]
    return os.path.join(output_dir, f'checkpoint-{max(numbered)}.pth') if numbered else ''


def auto_load_model(args, model, optimizer, loss_scaler, model_ema):
    """Load --resume (or, with --auto_resume, the highest checkpoint-<n>.pth). Returns the checkpoint dict or None."""
    latest = latest_numbered_checkpoint(args.output_dir) if args.output_dir else ''
    if args.auto_resume and not args.resume and args.output_dir:
        args.resume = latest
        print(f'Auto resume checkpoint: {args.resume}')
    elif latest and not args.resume and not args.eval:
        raise UserError(f'{latest} holds an earlier run and --auto_resume is false: continue it with --auto_resume '
                        'true, or pass another --output_dir')
    if not args.resume:
        return None
    try:
        checkpoint = safe_load(args.resume)
        if tuple(checkpoint['model']['pos_embed'].shape) != tuple(model.pos_embed.shape):
            checkpoint = update_ckpt(checkpoint, model)
        load_weights(model, checkpoint['model'], source=args.resume)
    except (OSError, KeyError, CheckpointError) as e:
        raise UserError(f'--resume {args.resume}: {e}') from None
    print(f'Resume checkpoint {args.resume}')
    if 'optimizer' in checkpoint and 'epoch' in checkpoint:
        optimizer.load_state_dict(checkpoint['optimizer'])
        if isinstance(checkpoint['epoch'], str):
            if not args.eval:
                raise UserError(f"--resume {args.resume} is a '{checkpoint['epoch']}' checkpoint; resume "
                                'training from a numbered checkpoint-<epoch>.pth')
        else:
            args.start_epoch = checkpoint['epoch'] + 1
        if model_ema is not None:
            model_ema.ema.load_state_dict(checkpoint.get('model_ema', checkpoint['model']), strict=False)
        if 'scaler' in checkpoint and loss_scaler is not None:
            loss_scaler.load_state_dict(checkpoint['scaler'])
    return checkpoint


def same_chunk(checkpoint, args):
    """Whether `checkpoint` was written by an earlier process of this very chunk (a restart after a kill) rather than
    by the previous chunk, which this one follows from fresh seeds and bests, as the original's chunks do."""
    saved = checkpoint.get('args')
    return (isinstance(checkpoint.get('epoch'), int) and 'rng' in checkpoint and saved is not None
            and (getattr(saved, 'end_epoch', None), getattr(saved, 'input_size', None)) == (args.end_epoch,
                                                                                            args.input_size))


def restore_run_state(checkpoint, args):
    """RNG states and bests of a restarted chunk. Returns (max_accuracy, max_accuracy_ema, log history)."""
    history = list(checkpoint.get('log', [])) if checkpoint is not None and not args.eval else []
    if checkpoint is None or args.eval or not same_chunk(checkpoint, args):
        return 0.0, 0.0, history
    states = checkpoint['rng']
    if len(states) != get_world_size():
        raise UserError(f'{args.resume} was written by {len(states)} processes, this run has {get_world_size()}: '
                        'restart with the same number of processes')
    set_rng_state(states[get_rank()])
    best = checkpoint.get('best', {})
    return best.get('max_accuracy', 0.0), best.get('max_accuracy_ema', 0.0), history


def save_epoch_checkpoint(args, epoch, model, optimizer, loss_scaler, model_ema, best, history):
    """checkpoint-<epoch>.pth with every rank's RNG states (call on every rank), the bests and the log history; the
    checkpoint --save_ckpt_num saves back is removed."""
    check_finite_weights(model)
    save_checkpoint(os.path.join(args.output_dir, f'checkpoint-{epoch}.pth'), model=model, optimizer=optimizer,
                    epoch=epoch, loss_scaler=loss_scaler, model_ema=model_ema, args=args, best=best, log=list(history))
    if is_main_process():
        old = os.path.join(args.output_dir, f'checkpoint-{epoch - args.save_ckpt_freq * args.save_ckpt_num}.pth')
        if os.path.exists(old):
            os.remove(old)


def save_model(args, epoch, model, optimizer, loss_scaler, model_ema=None):
    """checkpoint-best.pth / checkpoint-best-ema.pth, in the original's format."""
    check_finite_weights(model)
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
             'scaler': loss_scaler.state_dict(), 'args': args}
    if model_ema is not None:
        state['model_ema'] = model_ema.ema.state_dict()
    if is_main_process():
        atomic_save(state, os.path.join(args.output_dir, f'checkpoint-{epoch}.pth'))


def train_one_epoch(model, criterion, loader, optimizer, device, epoch, loss_scaler, max_norm, model_ema, mixup_fn,
                    start_steps, lr_values, wd_values, steps_per_epoch, args):
    model.train(True)
    logger = MetricLogger(delimiter='  ')
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    optimizer.zero_grad()
    total_train_time = 0.0
    update_freq = args.update_freq
    for i, (samples, targets) in enumerate(logger.log_every(loader, 10, f'Epoch: [{epoch}]')):
        step = i // update_freq
        if step >= steps_per_epoch:
            continue
        it = start_steps + step
        if i % update_freq == 0:
            for group in optimizer.param_groups:
                group['lr'] = lr_values[it] * group.get('lr_scale', 1.0)
                if group['weight_decay'] > 0:
                    group['weight_decay'] = wd_values[it]
        samples, targets = samples.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if args.input_size < args.base_input_size:
            samples = freq_crop(samples, args.input_size).detach()
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        start = time.time()
        with autocast(device, args.amp):
            loss = criterion(model(samples), targets)
        loss_value = loss.item()
        check_finite_loss(loss_value, epoch, step=i)
        update = (i + 1) % update_freq == 0
        grad_norm = loss_scaler(loss / update_freq, optimizer, clip_grad=max_norm, parameters=model.parameters(),
                                need_update=update)
        if update:
            optimizer.zero_grad()
            if model_ema is not None:
                model_ema.update(model)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        total_train_time += time.time() - start
        logger.update(loss=loss_value, lr=optimizer.param_groups[0]['lr'])
        if grad_norm is not None:
            logger.update(grad_norm=float(grad_norm))
    logger.synchronize_between_processes()
    print('Averaged stats:', logger)
    stats = {k: m.global_avg for k, m in logger.meters.items()}
    stats['total_train_time'] = all_reduce_mean(total_train_time)
    return stats


def main(args):
    from timm.optim import create_optimizer
    init_distributed_mode(args)
    print(args)
    device = torch.device(args.device)
    args.amp = bool(args.use_amp) and device.type == 'cuda'
    seed_per_rank(args.seed, python_random=True)  # RandAugment draws from python's random

    # images are read at base_input_size; the model is built for input_size
    data_args = argparse.Namespace(**{**vars(args), 'input_size': args.base_input_size, 'data_set': (
        'IMNET' if args.data_set == 'image_folder' else 'CIFAR' if args.data_set == 'CIFAR' else args.data_set),
        'train_interpolation': args.train_interpolation, 'eval_crop_ratio': args.crop_pct or 224 / 256,
        'repeated_aug': False, 'inat_category': 'name', 'ThreeAugment': False, 'src': False})
    try:
        dataset_train, nb_classes = build_dataset(True, data_args)
        dataset_val, _ = build_dataset(False, data_args) if not args.disable_eval else (None, None)
    except DatasetLayoutError as e:
        # shared.datasets speaks DeiT's --data-path; this script's flag is --data_path
        raise UserError(str(e).replace('--data-path', '--data_path')) from None
    if args.data_set in ('DIGITS', 'FAKE'):
        args.nb_classes = nb_classes
    if args.distributed:
        sampler_train = torch.utils.data.DistributedSampler(dataset_train, shuffle=True, seed=args.seed)
    else:
        sampler_train = torch.utils.data.RandomSampler(dataset_train)
    loader_train = torch.utils.data.DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                                               num_workers=args.num_workers, pin_memory=args.pin_mem, drop_last=True)
    loader_val = None
    if dataset_val is not None:
        sampler_val = torch.utils.data.DistributedSampler(dataset_val, shuffle=False) \
            if args.distributed and args.dist_eval else torch.utils.data.SequentialSampler(dataset_val)
        loader_val = torch.utils.data.DataLoader(dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size),
                                                 num_workers=args.num_workers, pin_memory=args.pin_mem)
    mixup_fn = build_mixup(args, args.nb_classes)

    model = create_model(args.model, num_classes=args.nb_classes, drop_path_rate=args.drop_path,
                         img_size=args.input_size)
    model.token_select = build_token_select(args)
    num_patches = model.patch_embed.num_patches
    try:
        model.token_select.check_num_patches(num_patches)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.finetune:
        state = to_timm_state_dict(safe_load(args.finetune))
        for k in ('head.weight', 'head.bias'):
            if k in state and state[k].shape != model.state_dict()[k].shape:
                del state[k]
        if 'pos_embed' in state:
            state['pos_embed'] = _resize(state['pos_embed'], int(math.isqrt(num_patches)))
        load_weights(model, state, strict=False, source=args.finetune)
    model.to(device)
    model_ema = build_model_ema(model, args, legacy=True)
    model, model_without_ddp = wrap_ddp(model, args, model_ema=model_ema)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)

    total_batch_size = args.batch_size * args.update_freq * get_world_size()
    steps_per_epoch = len(dataset_train) // total_batch_size
    if steps_per_epoch == 0:
        raise UserError(f'{len(dataset_train)} training images are fewer than one global batch of '
                         f'{total_batch_size} (batch x update_freq x processes)')
    print(f'LR = {args.lr:.8f}, batch size = {total_batch_size}, update frequency = {args.update_freq}, '
          f'training examples = {len(dataset_train)}, training steps per epoch = {steps_per_epoch}')
    optimizer = create_optimizer(args, model_without_ddp)
    loss_scaler = NativeScaler(device, enabled=args.amp)
    lr_values = cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs,
                                 warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_values = cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)
    criterion = torch.nn.CrossEntropyLoss()
    if mixup_fn is not None:
        from timm.loss import SoftTargetCrossEntropy
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        from timm.loss import LabelSmoothingCrossEntropy
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)

    run_dir = RunDir(args.output_dir, active=is_main_process() and not args.eval)
    run_dir.acquire()
    checkpoint = auto_load_model(args, model_without_ddp, optimizer, loss_scaler, model_ema)
    max_accuracy, max_accuracy_ema, history = restore_run_state(checkpoint, args)
    if history:
        run_dir.restore_log(history)
    token_select = model_without_ddp.token_select

    def eval_forward(m, images):
        if args.input_size < args.base_input_size:
            images = freq_crop(images, args.input_size)
        return m(images)

    if args.eval:
        token_select.sparse_inference = False
        return evaluate(loader_val, model, device, amp=args.amp, forward_fn=eval_forward)

    try:
        train_chunk(args, model, model_without_ddp, criterion, loader_train, loader_val, optimizer, device,
                    loss_scaler, model_ema, mixup_fn, lr_values, wd_values, steps_per_epoch, n_parameters,
                    token_select, num_patches, eval_forward, len(dataset_val) if dataset_val is not None else 0,
                    max_accuracy, max_accuracy_ema, history, run_dir)
    finally:
        run_dir.release()


def train_chunk(args, model, model_without_ddp, criterion, loader_train, loader_val, optimizer, device, loss_scaler,
                model_ema, mixup_fn, lr_values, wd_values, steps_per_epoch, n_parameters, token_select, num_patches,
                eval_forward, num_val_images, max_accuracy, max_accuracy_ema, history, run_dir):
    print(f'Start training for {args.epochs} epochs (this run stops before epoch {args.end_epoch})')
    start_time = time.time()
    for epoch in range(args.start_epoch, args.end_epoch):
        if args.distributed:
            loader_train.sampler.set_epoch(epoch)
        enter_epoch(token_select, epoch, num_patches)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, loss_scaler,
                                      args.clip_grad, model_ema, mixup_fn, epoch * steps_per_epoch, lr_values,
                                      wd_values, steps_per_epoch, args)
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch,
                     'n_parameters': n_parameters, 'expansion_stage': token_select.expansion_stage,
                     'train_kept_tokens': token_select.kept_tokens(num_patches), 'input_size': args.input_size}
        if loader_val is not None:
            token_select.sparse_inference = bool(args.sparse_eval)
            test_stats = evaluate(loader_val, model, device, amp=args.amp, forward_fn=eval_forward)
            print(f"Accuracy of the model on the {num_val_images} test images: {test_stats['acc1']:.1f}%")
            if max_accuracy < test_stats['acc1']:
                max_accuracy = test_stats['acc1']
                if args.output_dir and args.save_ckpt:
                    save_model(args, 'best', model_without_ddp, optimizer, loss_scaler, model_ema)
            print(f'Max accuracy: {max_accuracy:.2f}%')
            log_stats.update({f'test_{k}': v for k, v in test_stats.items()})
            if model_ema is not None and args.model_ema_eval:
                # the original's flag write misses the EMA copy: it is evaluated on all tokens
                model_ema.ema.token_select.update_current_stage(epoch)
                ema_stats = evaluate(loader_val, model_ema.ema, device, amp=args.amp, forward_fn=eval_forward)
                if max_accuracy_ema < ema_stats['acc1']:
                    max_accuracy_ema = ema_stats['acc1']
                    if args.output_dir and args.save_ckpt:
                        save_model(args, 'best-ema', model_without_ddp, optimizer, loss_scaler, model_ema)
                log_stats.update({f'test_{k}_ema': v for k, v in ema_stats.items()})
        history.append(log_stats)
        # after evaluation, whose loader draws from torch's generator: a restart continues with the same draws
        if args.output_dir and args.save_ckpt and ((epoch + 1) % args.save_ckpt_freq == 0 or
                                                   epoch + 1 == args.epochs):
            best = {'max_accuracy': max_accuracy, 'max_accuracy_ema': max_accuracy_ema}
            save_epoch_checkpoint(args, epoch, model_without_ddp, optimizer, loss_scaler, model_ema, best, history)
        run_dir.append_log(log_stats)
    print('Training time {}'.format(str(datetime.timedelta(seconds=int(time.time() - start_time)))))


if __name__ == '__main__':
    run_cli(main, parse_args())
