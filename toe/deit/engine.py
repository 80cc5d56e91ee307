"""ToE's DeiT engine: shared.engine's epoch plus the `total_train_time` meter the paper's speed-ups are ratios of.

total_train_time = sum over iterations of the wall time from the start of the forward to the end of the optimizer
step and EMA update (after a CUDA synchronize), data loading excluded, as ToE's engine.py logs it; rank-averaged.
"""
import time

import torch

from shared import engine as shared_engine
from shared.distributed import all_reduce_mean
from shared.engine import evaluate  # noqa: F401  (re-exported: DeiT's main imports both from engine)


class _StepTimer:
    """Times forward -> backward -> optimizer step (-> EMA update) by wrapping the loss scaler and the EMA."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == 'cuda'
        self.total = 0.0
        self._start = None

    def start(self):
        self._start = time.time()

    def stop(self):
        if self.cuda:
            torch.cuda.synchronize()
        if self._start is not None:
            self.total += time.time() - self._start
        self._start = None

    def wrap_scaler(self, loss_scaler):
        timer = self

        class TimedScaler:
            state_dict_key = getattr(loss_scaler, 'state_dict_key', 'amp_scaler')

            def __call__(self, *args, **kwargs):
                out = loss_scaler(*args, **kwargs)
                timer.stop()  # EMA time (if any) is added by the EMA wrapper
                return out

            def state_dict(self):
                return loss_scaler.state_dict()

            def load_state_dict(self, state):
                loss_scaler.load_state_dict(state)

        return TimedScaler()

    def wrap_ema(self, model_ema):
        if model_ema is None:
            return None
        timer = self

        class TimedEma:
            def update(self, model):
                start = time.time()
                model_ema.update(model)
                if timer.cuda:
                    torch.cuda.synchronize()
                timer.total += time.time() - start

            def __getattr__(self, name):
                return getattr(model_ema, name)

        return TimedEma()


def make_loss_fn(criterion, args, timer):
    """DeiT's loss (distillation wrapper, --bce-loss, --cosub), starting the step timer at the forward."""
    cosub, bce = getattr(args, 'cosub', False), getattr(args, 'bce_loss', False)
    bce_criterion = torch.nn.BCEWithLogitsLoss()

    def loss_fn(model, samples, targets):
        if bce:
            targets = targets.gt(0.0).type(targets.dtype)
        timer.start()
        if not cosub:
            return criterion(samples, model(samples), targets), {}
        # DeiT-III co-sub: two sub-models on a doubled batch. ToE's engine dropped the split of the outputs and
        # crashes here; the split is restored (toe/README.md, fixed crashes).
        outputs = model(torch.cat((samples, samples), dim=0))
        outputs = torch.split(outputs, outputs.shape[0] // 2, dim=0)
        loss = 0.25 * bce_criterion(outputs[0], targets) + 0.25 * bce_criterion(outputs[1], targets)
        loss = loss + 0.25 * bce_criterion(outputs[0], outputs[1].detach().sigmoid())
        loss = loss + 0.25 * bce_criterion(outputs[1], outputs[0].detach().sigmoid())
        return loss, {}

    return loss_fn


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler, max_norm=0,
                    model_ema=None, mixup_fn=None, set_training_mode=True, args=None, amp=False, print_freq=10):
    timer = _StepTimer(device)
    stats = shared_engine.train_one_epoch(
        model, criterion, data_loader, optimizer, device, epoch, timer.wrap_scaler(loss_scaler), max_norm=max_norm,
        model_ema=timer.wrap_ema(model_ema), mixup_fn=mixup_fn, set_training_mode=set_training_mode, amp=amp,
        loss_fn=make_loss_fn(criterion, args, timer), print_freq=print_freq,
        accum_iter=getattr(args, 'accum_iter', 1))
    stats['total_train_time'] = all_reduce_mean(timer.total)
    print(f'total_train_time (forward+backward+step, this epoch): {stats["total_train_time"]:.3f} s')
    return stats
