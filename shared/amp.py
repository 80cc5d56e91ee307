"""Mixed precision: torch.amp by default; NVIDIA apex only when it is importable and explicitly asked for."""
import contextlib

import torch

from timm.utils import dispatch_clip_grad


def amp_enabled(args, device):
    """`--amp`/`--no-amp` when given, otherwise on for CUDA and off on the CPU (where autocast would change numbers
    and not speed anything up)."""
    flag = getattr(args, 'amp', None)
    return bool(flag) if flag is not None else torch.device(device).type == 'cuda'


def autocast(device, enabled):
    device = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def apex_available():
    try:
        from apex import amp  # noqa: F401  (NVIDIA apex; the registry's `apex` package has no `amp`)
        return True
    except Exception:
        return False


class NativeScaler:
    """timm's NativeScaler on torch.amp.GradScaler for any device (a pass-through when disabled) that, like timm's
    NativeScalerWithGradNormCount, returns the gradient norm of `parameters` (after unscaling, before clipping)."""
    state_dict_key = 'amp_scaler'

    def __init__(self, device='cuda', enabled=True):
        device = torch.device(device)
        self.enabled = enabled and device.type == 'cuda'
        self._scaler = torch.amp.GradScaler(device.type, enabled=self.enabled)

    def __call__(self, loss, optimizer, clip_grad=None, clip_mode='norm', parameters=None, create_graph=False,
                 need_update=True):
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not need_update:
            return None
        norm = None
        if parameters is not None:
            self._scaler.unscale_(optimizer)
            parameters = [p for p in parameters if p.grad is not None]
            if clip_grad is not None and clip_grad > 0 and clip_mode == 'norm':
                norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
            else:
                norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm(2) for p in parameters])) \
                    if parameters else torch.tensor(0.)
                if clip_grad is not None and clip_grad > 0:
                    dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    # Checkpoints keep the GradScaler's own state (scale, growth tracker) under `state_dict_key`.
    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state):
        """Restore what `state_dict` returned (a checkpoint's `state_dict_key` entry)."""
        self._scaler.load_state_dict(state)


def build_loss_scaler(args, device):
    """The loss scaler for this run: scaling only under CUDA autocast (see `amp_enabled`)."""
    return NativeScaler(device, enabled=amp_enabled(args, device))
