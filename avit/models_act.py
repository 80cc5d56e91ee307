"""A-ViT: adaptive token halting on timm 1.0's VisionTransformer.

The model has no parameters beyond a plain ViT: each block's halting score is read from channel 0 of its output,
h = sigmoid(gate_scale * x[..., 0] - gate_center). Parameter names are timm's, so DeiT checkpoints, official A-ViT
checkpoints and `vit_*_patch16_224` state dicts load with the identity key mapping.

Two forwards:
- the masked dense loop of the official code (training, evaluation, exact parity): every block sees all tokens,
  halted ones are zeroed and masked as attention keys;
- the zipped loop (`zip_tokens=True`, inference only): halted tokens are removed from the sequence; in a batch the
  active tokens of each image are packed to the left and padded to the batch's largest active count, the padding is
  masked as keys. It gives the same logits and depth counters as the masked loop (up to float summation order).

Side outputs stay on the module under the official names (`rho_token`, `counter_token`, `halting_score_layer`,
`batch_cnt`) so that the engine reads them the same way with or without DDP (through `unwrap_model`).
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

__all__ = ['AdaptiveVisionTransformer', 'avit_tiny_patch16_224', 'avit_small_patch16_224', 'avit_models',
           'distribution_target', 'distribution_prior_loss']

# The official code adds this to the attention logits of halted keys (instead of -inf).
MASKED_SOFTMAX_BIAS = -1000.
# Padding keys of the zipped path: exp() of it underflows to 0 in fp16/bf16/fp32, and unlike -inf it keeps an image
# whose tokens have all halted (only padding left, while other images go on) finite.
PADDING_BIAS = -1e4


def masked_attention(attn, x, halted):
    """timm `Attention` with halted tokens masked as keys (additive -1000, every head, every query row).

    The logits are computed as (q @ k^T) * scale, the official order of operations (timm scales q first), so that
    the masked loop is bit-identical to the original on CPU fp32."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    logits = logits + halted.view(B, 1, 1, N) * MASKED_SOFTMAX_BIAS
    weights = attn.attn_drop(logits.softmax(dim=-1))
    x = (weights @ v).transpose(1, 2).reshape(B, N, attn.attn_dim)
    x = attn.norm(x)
    return attn.proj_drop(attn.proj(x))


def masked_block(block, x, halted):
    """Official `Block_ACT.forward_act` on a timm 1.0 `Block`: LN inputs and outputs of halted rows are zeroed
    (redundant since LN is per token, kept for parity), halted keys are masked in attention."""
    keep = (1. - halted).unsqueeze(-1)
    x = x + block.drop_path1(block.ls1(masked_attention(block.attn, block.norm1(x * keep) * keep, halted)))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x * keep) * keep)))
    return x


def packed_block(block, x, key_padding_bias):
    """A timm `Block` on packed active tokens; `key_padding_bias` (B,1,1,K) is PADDING_BIAS on padding keys, or None."""
    attn = block.attn
    B, K, C = x.shape
    y = block.norm1(x)
    qkv = attn.qkv(y).reshape(B, K, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if key_padding_bias is not None:
        key_padding_bias = key_padding_bias.to(q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_bias)
    y = attn.proj(attn.norm(y.transpose(1, 2).reshape(B, K, attn.attn_dim)))
    x = x + block.ls1(y)
    return x + block.ls2(block.mlp(block.norm2(x)))


def distribution_target(length=12, target_depth=8, std=1., buffer=0.02, standardized=True):
    """Official `get_distribution_target('gaussian')`: N(target_depth, std) pdf at 0..length-1, scaled so that the
    first `target_depth` entries sum to 1 - buffer. Not normalised: with the defaults it sums to ~3.2605."""
    i = torch.arange(length, dtype=torch.float64)
    pdf = torch.exp(-0.5 * ((i - target_depth) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    if standardized:
        pdf = pdf * (1. - buffer) / pdf[:target_depth].sum()
    return pdf.float()


def distribution_prior_loss(halting_score_layer, target, normalize_target=False):
    """KL prior of the official engine: H = stack(per-layer mean scores), H /= sum(H), clamp(H, .01, .99);
    KLDiv(log H, T, 'batchmean') on the 1-D H, i.e. sum / 12. `normalize_target` divides T by its sum first
    (the paper's intent; the original uses T unnormalised)."""
    h = torch.stack(list(halting_score_layer))
    h = (h / h.sum()).clamp(0.01, 0.99)
    t = target.to(h)
    if normalize_target:
        t = t / t.sum()
    return F.kl_div(h.log(), t, reduction='batchmean')


class AdaptiveVisionTransformer(VisionTransformer):
    """timm ViT with A-ViT's token-level adaptive computation time.

    gate_scale / gate_center: gamma and beta of the halting score (read at every forward, so the entry script may
    change them after construction, as the official file-name override does).
    prior_batch_axis_quirk: the official per-layer statistic is `mean(h[1:])`, which drops the first *image* of the
    batch and averages every token (issue NVlabs/A-ViT#4). False averages the patch tokens of every image instead.
    zip_tokens: in eval mode, use the zipped path that really removes halted tokens.
    """

    def __init__(self, gate_scale=10., gate_center=30., eps=0.01, prior_batch_axis_quirk=True, zip_tokens=False,
                 **kwargs):
        super().__init__(**kwargs)
        assert self.cls_token is not None and self.reg_token is None and not self.no_embed_class, \
            'A-ViT needs a single class token and a position embedding that covers it'
        self.gate_scale = gate_scale
        self.gate_center = gate_center
        self.eps = eps
        self.prior_batch_axis_quirk = prior_batch_axis_quirk
        self.zip_tokens = zip_tokens
        self.batch_cnt = 0  # global step counter, the x axis of the TensorBoard scalars
        self.rho_token = None
        self.counter_token = None
        self.halting_score_layer = []

    def halting_score(self, x):
        return torch.sigmoid(x[..., 0] * self.gate_scale - self.gate_center)

    def embed(self, x):
        return self.norm_pre(self._pos_embed(self.patch_embed(x)))

    def forward_features_act_token(self, x):
        """The official masked loop; returns the final-normed halting-weighted token states (B,N,C)."""
        x = self.embed(x)
        B, N, _ = x.shape
        one_minus_eps = 1 - self.eps
        c = x.new_zeros(B, N)           # cumulative halting score
        R = x.new_ones(B, N)            # remainder
        active = x.new_ones(B, N)       # 1 = still computed
        rho = x.new_zeros(B, N)         # ponder cost
        counter = x.new_ones(B, N)      # depth
        output = None
        self.halting_score_layer = []
        out = x
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            # Zero halted rows but keep autograd's identity, as the official `out.data *= mask` does; a plain
            # multiplication would cut the gradient of halted rows and change parameter grads.
            out = out + (out * active.unsqueeze(-1) - out).detach()
            block_output = masked_block(block, out, 1. - active)
            h = self.halting_score(block_output)
            if self.prior_batch_axis_quirk:
                self.halting_score_layer.append(torch.mean(h[1:]))
            else:
                self.halting_score_layer.append(torch.mean(h[:, 1:]))
            out = block_output.clone()
            block_output = block_output * active.unsqueeze(-1)
            if i == depth - 1:
                h = torch.ones_like(h)  # every token halts at the last layer
            c = c + h
            rho = rho + active
            reached = (c > one_minus_eps).float() * active
            delta1 = block_output * (R * reached).unsqueeze(-1)
            rho = rho + R * reached
            not_reached = (c < one_minus_eps).float()
            R = R - not_reached * h
            delta2 = block_output * (h * not_reached).unsqueeze(-1)
            counter = counter + not_reached
            active = (c < one_minus_eps).float()
            output = delta1 + delta2 if output is None else output + (delta1 + delta2)
        self.rho_token = rho
        self.counter_token = counter
        return self.norm(output)

    @torch.no_grad()
    def forward_features_zipped(self, x):
        """Inference with halted tokens removed; same halting rule and bookkeeping as the masked loop."""
        x = self.embed(x)
        B, N, C = x.shape
        one_minus_eps = 1 - self.eps
        c = x.new_zeros(B, N)
        R = x.new_ones(B, N)
        rho = x.new_zeros(B, N)
        counter = x.new_ones(B, N)
        output = x.new_zeros(B, N, C)
        # Packed state: token states of the active tokens, their positions in 0..N-1, and which slots are real.
        idx = torch.arange(N, device=x.device).expand(B, N)
        valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
        states = x
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            bias = None
            if not bool(valid.all()):
                bias = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
                bias = bias.masked_fill(~valid, PADDING_BIAS)[:, None, None, :]
            y = packed_block(block, states, bias)
            h = torch.ones(y.shape[:2], dtype=y.dtype, device=y.device) if i == depth - 1 else self.halting_score(y)
            vf = valid.to(y.dtype)
            c_a = c.gather(1, idx) + h * vf
            R_a = R.gather(1, idx)
            reached = (c_a > one_minus_eps).to(y.dtype) * vf
            not_reached = (c_a < one_minus_eps).to(y.dtype) * vf
            weight = R_a * reached + h * not_reached
            output.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, C), y * weight.unsqueeze(-1))
            # Padding slots point at some real token; they carry zero increments, so scatter_add leaves it alone.
            c.scatter_add_(1, idx, h * vf)
            rho.scatter_add_(1, idx, vf + R_a * reached)
            R.scatter_add_(1, idx, -not_reached * h)
            counter.scatter_add_(1, idx, not_reached)
            if i == depth - 1:
                break
            still = (c_a < one_minus_eps) & valid
            count = int(still.sum(1).max())
            if count == 0:
                break
            # Stable sort keeps the token order of the active ones; padding goes to the right.
            order = torch.sort((~still).to(torch.int8), dim=1, stable=True).indices[:, :count]
            idx = idx.gather(1, order)
            valid = still.gather(1, order)
            states = y.gather(1, order.unsqueeze(-1).expand(-1, -1, C)) * valid.unsqueeze(-1).to(y.dtype)
        self.rho_token = rho
        self.counter_token = counter
        self.halting_score_layer = []
        return self.norm(output)

    def forward_features(self, x):
        if self.zip_tokens and not self.training:
            return self.forward_features_zipped(x)
        return self.forward_features_act_token(x)

    def forward_head(self, x, pre_logits=False):
        # Only the class token's halting-weighted state is classified (no head dropout in the original).
        x = self.fc_norm(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


avit_models = {}


def _register(fn):
    avit_models[fn.__name__] = fn
    return fn


def _create_avit(pretrained=False, **kwargs):
    if pretrained:
        raise ValueError('pretrained weights are loaded by the entry script from a local DeiT checkpoint '
                         '(--pretrained [PATH]); the model factory never downloads')
    # The official factories ignore these timm-style keyword arguments (or never get them).
    kwargs.pop('drop_block_rate', None)
    kwargs.pop('pretrained_cfg', None)
    drop = kwargs.pop('drop_rate', 0.)
    # The official ViT applies `drop_rate` after the position embedding and in every block's MLP and projection.
    kwargs.setdefault('pos_drop_rate', drop)
    kwargs.setdefault('proj_drop_rate', drop)
    return AdaptiveVisionTransformer(drop_rate=drop, **kwargs)


@_register
def avit_tiny_patch16_224(pretrained=False, **kwargs):
    """A-ViT-T: DeiT-Tiny layout (embed 192, 3 heads, 12 blocks)."""
    return _create_avit(pretrained, patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, qkv_bias=True,
                        norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


@_register
def avit_small_patch16_224(pretrained=False, **kwargs):
    """A-ViT-S: DeiT-Small layout (embed 384, 6 heads, 12 blocks)."""
    return _create_avit(pretrained, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
                        norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


# The DeiT checkpoint each model starts from with `--pretrained` (file names of the official URLs).
DEIT_START_POINTS = {
    'avit_tiny_patch16_224': 'deit_tiny_patch16_224-a1311bcf.pth',
    'avit_small_patch16_224': 'deit_small_patch16_224-cd65a155.pth',
}
