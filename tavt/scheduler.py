"""ViT-pytorch's learning-rate schedules (LambdaLR factors of the base LR).

train.py calls `scheduler.step()` *before* `optimizer.step()`, as the original does, so update k uses the factor of
step k (the first update already runs at lr / warmup_steps)."""
import math

from torch.optim.lr_scheduler import LambdaLR


class WarmupLinearSchedule(LambdaLR):
    """Linear warm-up from 0 to 1 over `warmup_steps`, then linear decay to 0 at `t_total`."""

    def __init__(self, optimizer, warmup_steps, t_total, last_epoch=-1):
        self.warmup_steps = warmup_steps
        self.t_total = t_total
        super().__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step):
        if step < self.warmup_steps:
            return float(step) / float(max(1, self.warmup_steps))
        return max(0.0, float(self.t_total - step) / float(max(1.0, self.t_total - self.warmup_steps)))


class WarmupCosineSchedule(LambdaLR):
    """Linear warm-up from 0 to 1 over `warmup_steps`, then cosine decay (half a period with cycles=0.5)."""

    def __init__(self, optimizer, warmup_steps, t_total, cycles=.5, last_epoch=-1):
        self.warmup_steps = warmup_steps
        self.t_total = t_total
        self.cycles = cycles
        super().__init__(optimizer, self.lr_lambda, last_epoch=last_epoch)

    def lr_lambda(self, step):
        if step < self.warmup_steps:
            return float(step) / float(max(1.0, self.warmup_steps))
        progress = float(step - self.warmup_steps) / float(max(1, self.t_total - self.warmup_steps))
        return max(0.0, 0.5 * (1. + math.cos(math.pi * float(self.cycles) * 2.0 * progress)))


def build_scheduler(optimizer, decay_type, warmup_steps, t_total):
    cls = WarmupCosineSchedule if decay_type == 'cosine' else WarmupLinearSchedule
    return cls(optimizer, warmup_steps=warmup_steps, t_total=t_total)
