"""ToCom's models: the ToMe-patched DeiT (`deit_base_patch16_224` as ToCom means it) and the same model with a Token
Compensator on the query and value projections of every block (`deit_base_patch16_224_tocom`).

The compensator holds one low-rank "step" for each unit change of r (0->1, ..., S-1->S, S = 16 upstream). For a model
fine-tuned at r_src and run at r_tgt, the steps between the two are summed, with sign +1 going up and -1 going down,
scaled by `tocom_scale` and added to q and v. Being linear, the sum folds into the qkv weights (`fold_compensator`).

Names are resolved through `shared.models.create_model(name, MODELS, ...)`; timm's own `deit_base_patch16_224` is never
overwritten. `<timm ViT>_tocom` puts the compensator on any backbone ToMe supports (DINOv2 with registers, CLIP, SigLIP,
average-pooled ViTs; see shared.backbones), at that backbone's width.
"""
import copy
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from shared.backbones import require_supported
from shared.tome import ToMeAttention, ToMeBlock, apply_patch

__all__ = ['Compensator', 'ToComAttention', 'ToComBlock', 'add_compensator', 'fold_compensator', 'set_r',
           'is_tocom', 'compensator_state_dict', 'MODELS', 'DEFAULT_STEPS']

DEFAULT_STEPS = 16


class Compensator(nn.Module):
    """One compensator projection (ToCom's `Adapter` with `act=False`): x -> W_up (mask ⊙ dropout(W_down x)).

    `hidden = steps * group` channels; step k (r: k-1 -> k, k = 1..steps) owns the `group` hidden channels
    [hidden - group*k, hidden - group*(k-1)), i.e. mask(r) has its last group*r entries set, and the mask of a pair
    is mask(r_tgt) - mask(r_src). W_up starts at zero so a fresh compensator changes nothing.
    Key names (`adapter_down`, `adapter_up`) are upstream's so its checkpoints load.
    """

    def __init__(self, dim: int, hidden: int, steps: int = DEFAULT_STEPS, drop: float = 0.1):
        super().__init__()
        if hidden % steps:
            raise ValueError(f'compensator width {hidden} must be a multiple of the {steps} r-steps')
        self.dim, self.hidden, self.steps, self.group = dim, hidden, steps, hidden // steps
        self.adapter_down = nn.Linear(dim, hidden, bias=False)
        self.adapter_up = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.adapter_up.weight)
        self.dropout = nn.Dropout(drop)

    def check_r(self, r: int, name: str = 'r'):
        if not (isinstance(r, int) and 0 <= r <= self.steps):
            raise ValueError(f'{name}={r} is outside the range this compensator was trained for (0..{self.steps}); '
                             'ToCom can only move between r values it has steps for')

    def step_signs(self, r_tgt: int, r_src: int) -> torch.Tensor:
        """+1 for the steps r_src -> r_tgt when going up, -1 when going down, 0 elsewhere; one entry per step k=1..S."""
        self.check_r(r_tgt, 'r_tgt')
        self.check_r(r_src, 'r_src')
        k = torch.arange(1, self.steps + 1)
        return (k <= r_tgt).float() - (k <= r_src).float()

    def mask(self, r_tgt: int, r_src: int) -> torch.Tensor:
        """mask(r_tgt) - mask(r_src) over the hidden channels (step k's group sits k groups from the end)."""
        signs = self.step_signs(r_tgt, r_src).flip(0)  # hidden group j (from the start) is step S - j
        return signs.repeat_interleave(self.group).to(self.adapter_down.weight.device, self.adapter_down.weight.dtype)

    def forward(self, x: torch.Tensor, r_tgt: int, r_src: int) -> torch.Tensor:
        hidden = self.dropout(self.adapter_down(x))
        return self.adapter_up(hidden * self.mask(r_tgt, r_src).to(hidden.dtype))

    def delta_weight(self, r_tgt: int, r_src: int) -> torch.Tensor:
        """The equivalent `[dim, dim]` weight W_up diag(mask) W_down (inference: dropout is identity)."""
        return (self.adapter_up.weight * self.mask(r_tgt, r_src)) @ self.adapter_down.weight


class ToComAttention(ToMeAttention):
    """ToMe attention whose q and v get the compensation `s * delta(x; r_tgt, r_src)` (before the 1/sqrt(d) scaling);
    k, and hence the merge metric, is never compensated."""

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None, r_tgt: int = 0, r_src: int = 0):
        q, k, v = self.qkv_heads(x)
        if r_tgt != r_src:  # equal degrees: no adapter runs at all
            B, N, _ = x.shape
            q = q + self.s * self._heads(self.q_tocom(x, r_tgt, r_src), B, N)
            v = v + self.s * self._heads(self.v_tocom(x, r_tgt, r_src), B, N)
        else:
            self.q_tocom.check_r(r_tgt, 'r_tgt')
        return self.attend(x, q, k, v, size), k.mean(1)

    def _heads(self, t, B, N):
        return t.reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)


class ToComBlock(ToMeBlock):
    """ToMe block taking a `[r_tgt, r_src]` pair per layer: merges r_tgt tokens, compensates r_src -> r_tgt.
    The forward is ToMeBlock's (attention output freed before the merge and MLP); only the schedule differs."""

    def layer_schedule(self):
        pair = self._tome_info['r'].pop(0)
        if isinstance(pair, int) or len(pair) != 2:
            raise TypeError(f'a ToCom model takes model.r = [[r_tgt, r_src]] * depth (see tocom.models.set_r), '
                            f'got {pair!r} for a layer')
        r_tgt, r_src = int(pair[0]), int(pair[1])
        return r_tgt, (r_tgt, r_src)


def is_tocom(model) -> bool:
    return any(isinstance(m, ToComAttention) for m in model.modules())


def set_r(model, r_tgt: int, r_src: Optional[int] = None):
    """Set the merge schedule: plain ToMe model -> `model.r = r_tgt`; ToCom model -> `[[r_tgt, r_src]] * depth`
    (r_src defaults to r_tgt, i.e. no compensation), validated against the compensator's range."""
    if is_tocom(model):
        r_src = r_tgt if r_src is None else r_src
        comp = next(m for m in model.modules() if isinstance(m, Compensator))
        comp.check_r(r_tgt, 'r_tgt')
        comp.check_r(r_src, 'r_src')
        model.r = [[r_tgt, r_src]] * len(model.blocks)
    else:
        if r_src is not None and r_src != r_tgt:
            raise ValueError('a plain ToMe model has no compensator: r_src must equal r_tgt')
        model.r = r_tgt
    return model


def add_compensator(model: VisionTransformer, tocom_dim: int = 2 * DEFAULT_STEPS, tocom_scale: float = 0.1,
                    steps: int = DEFAULT_STEPS, freeze: bool = True) -> VisionTransformer:
    """Turn a ToMe-patched (or plain) timm ViT into a ToCom model in place: q/v compensators of hidden width
    `tocom_dim` (upstream: 16 * --tocom_dim) in every block; with `freeze`, only the `adapter` weights train.

    Any backbone ToMe supports (shared.backbones): the compensators take each block's own width, and the prefix
    tokens (class, registers) are protected by the merge as in ToMe. Others raise UnsupportedBackbone."""
    require_supported(model, 'ToCom', merges=True)
    if not hasattr(model, '_tome_info'):
        apply_patch(model, prop_attn=True, method='ToCom')
    for blk in model.blocks:
        blk.__class__ = ToComBlock
        attn = blk.attn
        attn.__class__ = ToComAttention
        dim = attn.qkv.in_features
        attn.q_tocom = Compensator(dim, tocom_dim, steps)
        attn.v_tocom = Compensator(dim, tocom_dim, steps)
        attn.s = tocom_scale
    if freeze:
        for name, p in model.named_parameters():
            p.requires_grad = 'adapter' in name
    return model


def compensator_state_dict(model) -> dict:
    """Only the compensator weights, under upstream's key names (`blocks.{i}.attn.{q,v}_tocom.adapter_{down,up}.weight`)."""
    return {k: v for k, v in model.state_dict().items() if '.q_tocom.' in k or '.v_tocom.' in k}


@torch.no_grad()
def fold_compensator(model, r_tgt: int, r_src: int) -> VisionTransformer:
    """A plain ToMe model (merging r_tgt) whose qkv weights include the compensation r_src -> r_tgt:
    W_q += s W_up diag(mask) W_down (same for W_v). Zero extra FLOPs; equal to the unfolded model up to rounding."""
    if not isinstance(model.blocks[0].attn.q_norm, nn.Identity):
        # the compensation is added to the normalised queries, which no change of W_q reproduces
        raise ValueError('the compensator cannot be folded into a model with query/key normalisation (qk_norm); '
                         'run it unfolded')
    folded = copy.deepcopy(model)
    for blk in folded.blocks:
        attn = blk.attn
        C = attn.attn_dim
        if r_tgt != r_src:
            attn.qkv.weight[:C] += attn.s * attn.q_tocom.delta_weight(r_tgt, r_src)
            attn.qkv.weight[2 * C:] += attn.s * attn.v_tocom.delta_weight(r_tgt, r_src)
        else:
            attn.q_tocom.check_r(r_tgt, 'r_tgt')
        del attn.q_tocom, attn.v_tocom, attn.s
        attn.__class__ = ToMeAttention
        blk.__class__ = ToMeBlock
    folded.r = r_tgt
    for p in folded.parameters():
        p.requires_grad = False
    return folded


# ---------------------------------------------------------------------------------------------------------- builders
DEIT_CONFIGS = {
    'tiny': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'small': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'base': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


def _deit(size, pretrained=False, **kwargs):
    if pretrained:
        raise ValueError('no weights are downloaded here: build with pretrained=False and pass the DeiT checkpoint '
                         'with --finetune')
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'drop_block_rate'):
        kwargs.pop(key, None)
    model = VisionTransformer(mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                              **{**DEIT_CONFIGS[size], **kwargs})
    return apply_patch(model, prop_attn=True)


def _tome_builder(size):
    def build(pretrained=False, tocom_scale=None, tocom_dim=None, **kwargs):
        # upstream's builder silently drops the ToCom kwargs main passes to every model
        return _deit(size, pretrained, **kwargs)
    build.__name__ = f'deit_{size}_patch16_224'
    build.__doc__ = f'DeiT-{size[0].upper()} with ToMe (proportional attention), as ToCom builds it; set model.r.'
    return build


def _tocom_builder(size):
    def build(pretrained=False, tocom_scale=0.1, tocom_dim=2 * DEFAULT_STEPS, tocom_steps=DEFAULT_STEPS, **kwargs):
        return add_compensator(_deit(size, pretrained, **kwargs), tocom_dim, tocom_scale, tocom_steps)
    build.__name__ = f'deit_{size}_patch16_224_tocom'
    build.__doc__ = f'DeiT-{size[0].upper()} with ToMe and the Token Compensator; only the compensator trains.'
    return build


MODELS = {}
for _size in DEIT_CONFIGS:
    MODELS[f'deit_{_size}_patch16_224'] = _tome_builder(_size)
    MODELS[f'deit_{_size}_patch16_224_tocom'] = _tocom_builder(_size)
deit_base_patch16_224 = MODELS['deit_base_patch16_224']
deit_base_patch16_224_tocom = MODELS['deit_base_patch16_224_tocom']


def create_tocom_model(name: str, tocom_scale: float = 0.1, tocom_dim: int = 2 * DEFAULT_STEPS,
                       tocom_steps: int = DEFAULT_STEPS, **kwargs):
    """Resolve a model name as ToCom's main does, through shared.models.create_model with this folder's builders:

    - `deit_{tiny,small,base}_patch16_224` -> ToMe-patched DeiT; `..._tocom` -> with the compensator;
    - any other `<timm ViT>_tocom` -> that timm ViT with ToMe and the compensator (any width);
    - any other timm name -> the timm model, ToMe-patched when it is a VisionTransformer (e.g. a ViT teacher).
    """
    from shared.models import create_model
    if name in MODELS:
        if name.endswith('_tocom'):
            kwargs.update(tocom_scale=tocom_scale, tocom_dim=tocom_dim, tocom_steps=tocom_steps)
        return create_model(name, MODELS, **kwargs)
    if name.endswith('_tocom'):
        base = create_model(name[:-len('_tocom')], MODELS, **kwargs)
        return add_compensator(base, tocom_dim, tocom_scale, tocom_steps)
    model = create_model(name, MODELS, **kwargs)
    if isinstance(model, VisionTransformer) and not hasattr(model, '_tome_info'):
        apply_patch(model, prop_attn=True)
    return model


def load_compensator(model, path):
    """Load a compensator checkpoint (`{'model': {name: weight}}` with upstream's key names) into a ToCom model,
    checking that it covers every compensator weight and was trained for this width and number of r-steps."""
    from shared.checkpoint import CheckpointError, safe_load
    if not is_tocom(model):
        raise ValueError(f'--tocom_path {path} needs a model with a compensator (a *_tocom model name)')
    checkpoint = safe_load(path)
    state = checkpoint['model'] if isinstance(checkpoint, dict) and 'model' in checkpoint else checkpoint
    state = {k: v for k, v in state.items() if '.q_tocom.' in k or '.v_tocom.' in k}
    own = compensator_state_dict(model)
    if not state:
        raise CheckpointError(f'{path} holds no compensator weights (keys *.q_tocom.* / *.v_tocom.*): '
                              'is it a ToCom pre-training checkpoint.pth?')
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f'{path} does not fit this model\'s {len(model.blocks)} blocks: missing {missing[:4]}, '
                              f'unexpected {unexpected[:4]}')
    comp = model.blocks[0].attn.q_tocom
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            down = state[k.replace('adapter_up', 'adapter_down')] if 'adapter_up' in k else v
            raise CheckpointError(
                f'{path} was trained for embedding width {down.shape[1]} with compensator width {down.shape[0]}; '
                f'this model has width {comp.dim} and compensator width {comp.hidden} '
                f'({comp.steps} steps x {comp.group}): {k} is {tuple(v.shape)}, expected {tuple(own[k].shape)}')
    model.load_state_dict(state, strict=False)
    return model
