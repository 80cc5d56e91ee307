"""A-ViT's train and eval steps on top of DeiT's shared engine: ponder loss, distributional prior, depth statistics
(meters, TensorBoard tags and intervals of the official engine_act.py), data-dependent GFLOPs, and `--demo`'s
token-depth pictures.

The side outputs (`rho_token`, `counter_token`, `halting_score_layer`, `batch_cnt`) are read from the unwrapped
model, so the same code runs with DDP, without it, and on the CPU (the original needs `model.module` and CUDA).
"""
import os

import numpy as np
import torch

from shared import engine as deit_engine
from shared.distributed import all_reduce_mean, is_main_process, unwrap_model
from shared.flops import vit_dims, vit_macs
from avit.models_act import distribution_prior_loss, distribution_target


def depth_statistics(counter_token):
    """The official statistics of the (B, N) depth counters (class token included)."""
    cnt = counter_token.detach().float()
    return {
        'cnt_token_mean': float(cnt.mean()),
        'cnt_token_max': float(cnt.max()),
        'cnt_token_min': float(cnt.min()),
        'cnt_token_diff': float((cnt.max(dim=-1)[0] - cnt.min(dim=-1)[0]).mean()),
        'remaining_compute': float((cnt / 12.).mean()),
    }


def per_image_macs(model, counter_token):
    """MACs of each image from its depth counters: block l sees the n_l tokens of depth >= l (attention and MLP),
    in the project's convention (shared.flops.vit_macs)."""
    dims, depth = vit_dims(unwrap_model(model))
    cnt = counter_token.detach().float()
    tokens = [(cnt >= layer).sum(dim=1).double() for layer in range(1, depth + 1)]
    return vit_macs(tokens, **dims)


def act_loss_fn(args, criterion, optimizer, tb_logger=None, tb_freq=100):
    """`loss_fn` for shared.engine.train_one_epoch: task + ponder + KL prior, the official meters, and the
    official TensorBoard scalars every `tb_freq` global steps (x axis: the model's `batch_cnt`)."""
    target = distribution_target() if args.distr_prior_alpha > 0. else None
    normalize_target = getattr(args, 'distr_prior_target', 'original') == 'normalized'

    def loss_fn(model, samples, targets):
        outputs = model(samples)
        loss = criterion(samples, outputs, targets)
        act = unwrap_model(model)
        act.batch_cnt += 1
        ponder_loss_token = torch.mean(act.rho_token) * args.ponder_token_scale
        loss = loss + ponder_loss_token
        meters = depth_statistics(act.counter_token)
        meters['ponder_loss_token'] = ponder_loss_token.item()
        # The official meter order puts remaining_compute after the ponder loss.
        meters['remaining_compute'] = meters.pop('remaining_compute')
        distr_prior_loss = None
        if target is not None:
            distr_prior_loss = args.distr_prior_alpha * distribution_prior_loss(
                act.halting_score_layer, target.to(outputs.device), normalize_target)
            if distr_prior_loss.item() > 0.:
                loss = loss + distr_prior_loss
            meters['distri_prior_loss'] = distr_prior_loss.item()
        if tb_logger is not None and act.batch_cnt % tb_freq == 0:
            step = act.batch_cnt
            tb_logger.add_scalar('train/lr', optimizer.param_groups[0]['lr'], step)
            tb_logger.add_scalar('train/loss', loss.item(), step)
            for key in ('cnt_token_mean', 'cnt_token_max', 'cnt_token_min'):
                tb_logger.add_scalar(f'train/{key}', meters[key], step)
            tb_logger.add_scalar('train/avg_cnt_token_diff', meters['cnt_token_diff'], step)
            tb_logger.add_scalar('train/ponder_loss_token', meters['ponder_loss_token'], step)
            tb_logger.add_scalar('train/expected_depth_ratio', meters['remaining_compute'], step)
            if distr_prior_loss is not None:
                tb_logger.add_scalar('train/distr_prior_loss', distr_prior_loss.item(), step)
        return loss, meters

    return loss_fn


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler, max_norm=0,
                    model_ema=None, mixup_fn=None, set_training_mode=True, args=None, tb_logger=None, amp=False):
    freq = getattr(args, 'print_freq', 100)
    return deit_engine.train_one_epoch(
        model, criterion, data_loader, optimizer, device, epoch, loss_scaler, max_norm, model_ema, mixup_fn,
        set_training_mode=set_training_mode, amp=amp, print_freq=freq, accum_iter=getattr(args, 'accum_iter', 1),
        loss_fn=act_loss_fn(args, criterion, optimizer, tb_logger, tb_freq=freq))


@torch.no_grad()
def evaluate(data_loader, model, device, epoch=0, tb_logger=None, args=None, amp=False):
    """DeiT's evaluation plus the depth statistics of every evaluated token. Prints the mean depth and the GFLOPs
    averaged over the evaluated images (the original only logs the depth to TensorBoard). Returns
    (stats with the official keys loss/acc1/acc5, act stats)."""
    counters = []

    def forward(m, images):
        logits = m(images)
        counters.append(unwrap_model(m).counter_token.detach().float().cpu())
        return logits

    stats = deit_engine.evaluate(data_loader, model, device, amp=amp, forward_fn=forward, print_freq=10)
    cnt = torch.cat(counters) if counters else torch.ones(0, 1)
    act_stats = depth_statistics(cnt) if len(cnt) else {}
    if len(cnt):
        macs = per_image_macs(model, cnt)
        act_stats['gflops'] = float(macs.mean()) / 1e9
        act_stats['images'] = len(cnt)
        if getattr(args, 'dist_eval', False):  # each rank saw a shard
            for key in ('cnt_token_mean', 'cnt_token_diff', 'remaining_compute', 'gflops'):
                act_stats[key] = float(all_reduce_mean(act_stats[key]))
        print('* Mean depth {:.3f} / 12 (min {:.0f}, max {:.0f})  GFLOPs {:.3f} averaged over {} images'.format(
            act_stats['cnt_token_mean'], act_stats['cnt_token_min'], act_stats['cnt_token_max'],
            act_stats['gflops'], act_stats['images']))
    if tb_logger is not None:
        tb_logger.add_scalar('test/acc_top1', stats['acc1'], epoch)
        tb_logger.add_scalar('test/acc_top5', stats['acc5'], epoch)
        tb_logger.add_scalar('test/loss', stats['loss'], epoch)
        if act_stats:
            step = unwrap_model(model).batch_cnt
            for key in ('cnt_token_mean', 'cnt_token_max', 'cnt_token_min'):
                tb_logger.add_scalar(f'test/{key}', act_stats[key], step)
            tb_logger.add_scalar('test/avg_cnt_token_diff', act_stats['cnt_token_diff'], step)
            tb_logger.add_scalar('test/expected_depth_ratio', act_stats['remaining_compute'], step)
    return {k: stats[k] for k in ('loss', 'acc1', 'acc5')}, act_stats


# ---------------------------------------------------------------------------------------------------------------
# --demo

# The official combined picture crops the 640x480 matplotlib figure to rows 59..425 and columns 80..559.
HEATMAP_CROP = (80, 59, 560, 426)  # PIL box: left, top, right, bottom


def combine_side_by_side(image_path, heatmap_path, out_path):
    """Image left, cropped depth map right, both resized (bicubic) to the taller one's height."""
    from PIL import Image
    image = Image.open(image_path).convert('RGB')
    heatmap = Image.open(heatmap_path).convert('RGB').crop(HEATMAP_CROP)
    height = max(image.height, heatmap.height)
    parts = [p.resize((int(p.width * height / p.height), height), Image.BICUBIC) for p in (image, heatmap)]
    combined = Image.new('RGB', (sum(p.width for p in parts), height))
    combined.paste(parts[0], (0, 0))
    combined.paste(parts[1], (parts[0].width, 0))
    combined.save(out_path, quality=95)


@torch.no_grad()
def visualize(data_loader, model, device, args=None, out_dir='./token_act_visualization/', amp=False):
    """The official `--demo`: for each val batch (50 images = one ImageNet class, the val set being sorted), the
    image whose 197 depth counters have the largest standard deviation is drawn as class{c}_ref.jpg,
    class{c}_token_depth.jpg (patch depths as a 14x14 `hot` heat map with a colour bar) and class{c}_combined.jpg."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import torchvision.utils as vutils
    from shared.amp import autocast
    from shared.metrics import MetricLogger

    model.eval()
    act = unwrap_model(model)
    grid = act.patch_embed.grid_size
    os.makedirs(out_dir, exist_ok=True)
    metric_logger = MetricLogger(delimiter='  ')
    class_set, max_std, written = set(), 0., []
    for images, target in metric_logger.log_every(data_loader, 100, 'Visualize:'):
        images = images.to(device, non_blocking=True)
        with autocast(device, amp):
            model(images)
        cnt = act.counter_token.detach().float().cpu().numpy()
        stds = np.std(cnt, axis=-1)
        value, idx = np.max(stds), int(np.argmax(stds))
        labels = set(target.tolist())
        if not labels <= class_set:
            print('Now visualizing token depth for class {}/{}.'.format(int(target[idx]), args.nb_classes
                                                                        if args is not None else '?'))
            max_std = 0
        class_set |= labels
        if value < max_std or not is_main_process():
            continue
        max_std = value
        c = int(target[idx])
        stem = os.path.join(out_dir, f'class{c}')
        plt.imshow(cnt[idx, 1:].reshape(grid), cmap='hot', interpolation='nearest')
        plt.axis('off')
        cb = plt.colorbar(shrink=0.8)
        plt.savefig(stem + '_token_depth.jpg')
        vutils.save_image(images[idx].float().cpu(), stem + '_ref.jpg', normalize=True, scale_each=True)
        combine_side_by_side(stem + '_ref.jpg', stem + '_token_depth.jpg', stem + '_combined.jpg')
        cb.remove()
        written.append(c)
    plt.close('all')
    print('Visualization done.')
    return written
