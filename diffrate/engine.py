"""DiffRate's search epoch and evaluation (the reference's engine.py, on the shared metric logger and AMP)."""
import torch
from timm.utils import accuracy

from shared.amp import autocast
from shared.distributed import unwrap_model
from shared.metrics import MetricLogger, SmoothedValue
from shared.trainer import check_finite_loss

FLOPS_WEIGHT = 5.0                  # lambda of the squared FLOPs penalty
COMPRESSION_RATE_PRINT_FREQ = 100   # iterations between two logs of the current kept numbers


def log_kept_numbers(model):
    prune, merge = unwrap_model(model).get_kept_num()
    print(f'prune kept number:{prune}')
    print(f'merge kept number:{merge}')
    return prune, merge


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler, max_norm=None,
                    mixup_fn=None, set_training_mode=True, target_flops=3.0, warm_up=False, amp=False,
                    print_freq=10, accum_iter=1):
    """One search epoch: loss = CE + lambda * (GFLOPs - target)^2, only the architecture parameters step (every
    `accum_iter` batches, on their mean gradient)."""
    model.train(set_training_mode)
    metric_logger = MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr_architecture', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = f'Epoch: [{epoch}]'
    # --warmup_compression_rate: the first epoch is driven by the classification loss alone
    lamb = 0.0 if (warm_up and epoch < 1) else FLOPS_WEIGHT
    arch_parameters = list(unwrap_model(model).arch_parameters())

    for step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        samples, targets = samples.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        with autocast(device, amp):
            outputs, flops = model(samples)
            loss_cls = criterion(outputs, targets)
        gflops = flops / 1e9
        loss_flops = (gflops - target_flops) ** 2
        loss = lamb * loss_flops + loss_cls.float()
        loss_cls_value = loss_cls.item()
        check_finite_loss(loss_cls_value, epoch, step)

        if step % accum_iter == 0:
            optimizer.zero_grad()
        update = (step + 1) % accum_iter == 0
        if torch.is_tensor(loss) and loss.requires_grad:
            grad_norm = loss_scaler(loss / accum_iter if accum_iter > 1 else loss, optimizer, clip_grad=max_norm,
                                    parameters=arch_parameters, need_update=update)
        else:
            # an eval-mode search (the reference's behaviour with --finetune) gives the proxies no gradient
            grad_norm = torch.tensor(0.)
        if device.type == 'cuda':
            torch.cuda.synchronize()

        if step % COMPRESSION_RATE_PRINT_FREQ == 0:
            log_kept_numbers(model)

        metric_logger.update(loss_cls=loss_cls_value)
        metric_logger.update(loss_flops=float(loss_flops.detach()) if torch.is_tensor(loss_flops) else loss_flops)
        metric_logger.update(flops=float(gflops.detach()) if torch.is_tensor(gflops) else gflops)
        if grad_norm is not None:  # None on the batches that only accumulate
            metric_logger.update(grad_norm=float(grad_norm))
        metric_logger.update(lr_architecture=optimizer.param_groups[0]['lr'])
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader, model, device, amp=False, print_freq=10):
    """Top-1/top-5, CE loss and the analytic GFLOPs of the current schedule; prints the kept numbers and
    `* Acc@1 .. Acc@5 .. loss .. flops ..` as the reference does."""
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = MetricLogger(delimiter='  ')
    model.eval()
    for images, target in metric_logger.log_every(data_loader, print_freq, 'Test:'):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            output, flops = model(images)
            loss = criterion(output, target)
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[-1])))
        batch_size = images.shape[0]
        metric_logger.update(flops=float(flops) / 1e9)
        metric_logger.update(loss=loss.item())
        metric_logger.meters['acc1'].update(acc1.item(), n=batch_size)
        metric_logger.meters['acc5'].update(acc5.item(), n=batch_size)
    log_kept_numbers(model)
    metric_logger.synchronize_between_processes()
    print('* Acc@1 {top1.global_avg:.3f} Acc@5 {top5.global_avg:.3f} loss {losses.global_avg:.3f} '
          'flops {flops.global_avg:.3f}'.format(top1=metric_logger.acc1, top5=metric_logger.acc5,
                                                losses=metric_logger.loss, flops=metric_logger.flops))
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
