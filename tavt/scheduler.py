"""ViT-pytorch's learning-rate schedule: a linear warm-up, then a linear or a half-period cosine decay, as a
`LambdaLR` factor of the base LR.

train.py calls `scheduler.step()` *before* `optimizer.step()`, as the original does, so update k uses the factor of
step k (the first update already runs at lr / warmup_steps)."""
import functools
import math

from torch.optim.lr_scheduler import LambdaLR


def warmup_decay_factor(step, warmup_steps, total_steps, decay_type):
    """The factor of the base LR at `step`: step / warmup_steps during the warm-up, then from 1 down to 0 at
    `total_steps`, along a half cosine period ('cosine') or a straight line (any other `decay_type`). The linear
    decay stays at 0 past `total_steps`; the cosine one, like the original's, would rise again (training stops at
    `total_steps`)."""
    if step < warmup_steps:
        return step / max(warmup_steps, 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    if decay_type == 'cosine':
        # pi * done equals the original's pi * cycles * 2 * done for cycles = 0.5 to the last bit (powers of two)
        return 0.5 * (1.0 + math.cos(math.pi * ((step - warmup_steps) / decay_steps)))
    return max((total_steps - step) / decay_steps, 0.0)


def build_scheduler(optimizer, decay_type, warmup_steps, t_total):
    factor = functools.partial(warmup_decay_factor, warmup_steps=warmup_steps, total_steps=t_total,
                               decay_type=decay_type)
    return LambdaLR(optimizer, factor)
