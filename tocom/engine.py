"""ToCom's training step on DeiT's shared engine: the r schedule of every iteration and the loss.

- Pre-training (`--r_src -1`): each iteration draws a pair (m, n), m != n, uniformly in 0..S. The student (frozen
  backbone + compensator) merges m tokens per layer and compensates n -> m; the teacher (the same backbone, plain ToMe,
  eval mode) merges n. The loss is the distillation criterion (soft KD with alpha 1 in the paper's command).
- Downstream fine-tuning (`--r_src k`): plain ToMe with r = k every iteration.
"""
import random

import torch

from shared.distributed import unwrap_model
from shared.engine import evaluate, train_one_epoch  # noqa: F401  (re-exported: DeiT's engine module layout)
from tocom.models import DEFAULT_STEPS, set_r


def sample_pair(rng: random.Random, steps: int = DEFAULT_STEPS):
    """(r_tgt, r_src) uniform on {0..steps}^2 without the diagonal, drawn as upstream does (redraw while equal)."""
    while True:
        m, n = rng.randint(0, steps), rng.randint(0, steps)
        if m != n:
            return m, n


def make_loss_fn(args, criterion, rng: random.Random, steps: int = DEFAULT_STEPS):
    """`loss_fn(model, samples, targets) -> (loss, meters)` for shared.engine.train_one_epoch."""
    teacher = getattr(criterion, 'teacher_model', None)

    def loss_fn(model, samples, targets):
        student = unwrap_model(model)
        meters = {}
        if args.r_src == -1:
            m, n = sample_pair(rng, steps)
            set_r(student, m, n)
            if teacher is not None and hasattr(teacher, '_tome_info'):
                teacher.r = n  # the teacher is the plain ToMe model at the source degree
            meters = {'r_tgt': m, 'r_src': n}
        else:
            set_r(student, args.r_src)
        if args.cosub:
            # DeiT-III's cosub: the batch twice, BCE between the two halves and against the targets
            samples = torch.cat((samples, samples), dim=0)
        outputs = model(samples)
        if args.bce_loss:
            targets = targets.gt(0.0).type(targets.dtype)
        if args.cosub:
            bce = torch.nn.BCEWithLogitsLoss()
            out0, out1 = torch.split(outputs, outputs.shape[0] // 2, dim=0)
            loss = 0.25 * (bce(out0, targets) + bce(out1, targets) + bce(out0, out1.detach().sigmoid())
                           + bce(out1, out0.detach().sigmoid()))
        else:
            loss = criterion(samples, outputs, targets)
        return loss, meters

    return loss_fn
