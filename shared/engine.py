"""DeiT's engine: one training epoch, evaluation, and the set-up every DeiT-style entry script repeats
(linear lr scaling, optimizer, scheduler, loss scaler, mixup, criterion, epoch logs)."""
import contextlib
import os

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer
from timm.scheduler import create_scheduler
from timm.utils import accuracy

from shared.amp import amp_enabled, autocast, build_loss_scaler
from shared.distributed import get_world_size, init_distributed_mode, is_main_process, seed_per_rank, wrap_ddp
from shared.losses import DistillationLoss
from shared.metrics import MetricLogger, SmoothedValue
from shared.trainer import check_finite_loss


def start_run(args):
    """The opening of a DeiT-style main: the process group (or a single process), the arguments printed, the device
    and AMP, per-rank seeds (python's `random` too: RandAugment and random erasing draw from it, so the same command
    gives the same run) and cuDNN autotuning. Returns (device, amp, this rank's seed)."""
    init_distributed_mode(args)
    print(args)
    device = torch.device(args.device)
    seed = seed_per_rank(args.seed, python_random=True)
    torch.backends.cudnn.benchmark = True
    return device, amp_enabled(args, device), seed


def scale_lr(args):
    """DeiT's linear scaling by the global batch: lr * batch_size * world_size * accum_iter / 512 unless
    --unscale-lr."""
    if not getattr(args, 'unscale_lr', False):
        args.lr = args.lr * args.batch_size * get_world_size() * getattr(args, 'accum_iter', 1) / 512.0
    return args.lr


def build_optimization(args, model_without_ddp, device):
    """Optimizer, loss scaler and lr scheduler exactly as DeiT builds them (timm factories)."""
    scale_lr(args)
    optimizer = create_optimizer(args, model_without_ddp)
    loss_scaler = build_loss_scaler(args, device)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    return optimizer, loss_scaler, lr_scheduler


def prepare_model(model, args, device, find_unused_parameters=False, legacy_ema=False):
    """DeiT's set-up of a built model: on the device, its weight EMA (--model-ema), wrapped in DDP when distributed.
    Returns (model, model_without_ddp, model_ema, number of trainable parameters)."""
    model.to(device)
    model_ema = build_model_ema(model, args, legacy=legacy_ema)
    model, model_without_ddp = wrap_ddp(model, args, find_unused_parameters, model_ema=model_ema)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print('number of params:', n_parameters)
    return model, model_without_ddp, model_ema, n_parameters


def build_mixup(args, nb_classes):
    active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if not active:
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)


def build_criterion(args, mixup_fn, teacher_model=None):
    """DeiT's choice: soft-target CE under mixup, label smoothing otherwise, BCE with --bce-loss; wrapped in
    DistillationLoss (a no-op wrapper when --distillation-type none)."""
    if mixup_fn is not None:
        base = SoftTargetCrossEntropy()
    elif args.smoothing:
        base = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base = torch.nn.CrossEntropyLoss()
    if getattr(args, 'bce_loss', False):
        base = torch.nn.BCEWithLogitsLoss()
    return DistillationLoss(base, teacher_model, getattr(args, 'distillation_type', 'none'),
                            getattr(args, 'distillation_alpha', 0.5), getattr(args, 'distillation_tau', 1.0))


def _default_loss(criterion, bce):
    def loss_fn(model, samples, targets):
        outputs = model(samples)
        if bce:
            targets = targets.gt(0.0).type(targets.dtype)
        return criterion(samples, outputs, targets), {}
    return loss_fn


def build_model_ema(model, args, legacy=False):
    """The weight EMA of `--model-ema` (decay `--model-ema-decay`, on the CPU with `--model-ema-force-cpu`), or None.
    legacy: timm's first ModelEma, as DeiT and the scripts copied from it use; else ModelEmaV2."""
    if not args.model_ema:
        return None
    if legacy:
        from timm.utils import ModelEma
        return ModelEma(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else '', resume='')
    from timm.utils import ModelEmaV2
    return ModelEmaV2(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None)


def to_device(device, *tensors):
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler, max_norm=0,
                    model_ema=None, mixup_fn=None, set_training_mode=True, amp=False, loss_fn=None,
                    bce_loss=False, print_freq=10, tb_logger=None, header=None, accum_iter=1):
    """One epoch as DeiT's engine does it. `loss_fn(model, samples, targets) -> (loss, {meter: value})` lets a
    method compute its own loss (ponder, distillation, FLOPs penalty, ...) and log its own meters.

    accum_iter: the optimizer (and the EMA) steps once every `accum_iter` batches on the mean of their gradients, as
    MAE's engine does; a last incomplete group of an epoch is dropped."""
    model.train(set_training_mode)
    loss_fn = loss_fn or _default_loss(criterion, bce_loss)
    metric_logger = MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = header or f'Epoch: [{epoch}]'
    for step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        samples, targets = to_device(device, samples, targets)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with autocast(device, amp):
            loss, extra = loss_fn(model, samples, targets)
        loss_value = loss.item()
        check_finite_loss(loss_value, epoch)
        if step % accum_iter == 0:
            optimizer.zero_grad()
        update = (step + 1) % accum_iter == 0
        if accum_iter > 1:
            loss = loss / accum_iter
        # DDP reduces gradients only on the batch that steps; second-order optimizers (timm's AdaHessian) need the
        # graph of the gradients
        with contextlib.nullcontext() if update or not hasattr(model, 'no_sync') else model.no_sync():
            loss_scaler(loss, optimizer, clip_grad=max_norm, parameters=model.parameters(),
                        create_graph=getattr(optimizer, 'is_second_order', False), need_update=update)
        if device.type == 'cuda':
            torch.cuda.synchronize()  # per-step timings and the EMA see finished kernels
        if model_ema is not None and update:
            model_ema.update(model)
        metric_logger.update(loss=loss_value, **extra, lr=optimizer.param_groups[0]['lr'])
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    if tb_logger is not None:
        tb_logger.log(stats, epoch, prefix='train')
    return stats


@torch.no_grad()
def evaluate(data_loader, model, device, amp=False, forward_fn=None, print_freq=10, header='Test:'):
    """DeiT's evaluation: prints `* Acc@1 .. Acc@5 .. loss ..` and returns the global averages.

    `forward_fn(model, images) -> logits` or `-> (logits, {meter: value})` for methods that report more per batch
    (mean depth, FLOPs); those meters are averaged over images."""
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = MetricLogger(delimiter='  ')
    model.eval()
    for images, target in metric_logger.log_every(data_loader, print_freq, header):
        images, target = to_device(device, images, target)
        with autocast(device, amp):
            result = forward_fn(model, images) if forward_fn is not None else model(images)
            output, extra = result if isinstance(result, tuple) else (result, {})
            loss = criterion(output, target)
        top1, top5 = accuracy(output, target, topk=(1, min(5, output.shape[-1])))
        metric_logger.update(loss=loss.item())
        for name, value in (('acc1', top1), ('acc5', top5), *extra.items()):
            metric_logger.meters[name].update(float(value), n=images.shape[0])  # averaged over images
    metric_logger.synchronize_between_processes()
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}")  # DeiT's summary line
    return stats


class TensorboardLogger:
    """A SummaryWriter on rank 0 only (no-op elsewhere or without a log dir)."""

    def __init__(self, log_dir):
        self.writer = None
        if log_dir and is_main_process():
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir)

    def add_scalar(self, tag, value, step):
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def log(self, stats, step, prefix):
        for k, v in stats.items():
            if isinstance(v, (int, float)):
                self.add_scalar(f'{prefix}/{k}', v, step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
