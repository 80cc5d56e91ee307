"""A-ViT: adaptive token halting on timm 1.0's VisionTransformer.

The model has no parameters beyond a plain ViT: each block's halting score is read from channel 0 of its output,
h = sigmoid(gate_scale * x[..., 0] - gate_center). Parameter names are timm's, so DeiT checkpoints, official A-ViT
checkpoints and `vit_*_patch16_224` state dicts load with the identity key mapping.

Two forwards:
- the masked dense loop of the official code (training; evaluation with `zip_tokens=False`, exact parity): every
  block sees all tokens, halted ones are zeroed and masked as attention keys;
- the zipped loop (`zip_tokens=True`, the default in eval mode): halted tokens are removed from the sequence; in a batch the
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

__all__ = ['AdaptiveComputation', 'AdaptiveVisionTransformer', 'adaptive_from_timm', 'avit_tiny_patch16_224', 'avit_small_patch16_224', 'avit_models',
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
    attn_input = x
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    logits = logits + halted.view(B, 1, 1, N) * MASKED_SOFTMAX_BIAS
    weights = attn.attn_drop(logits.softmax(dim=-1))
    x = (weights @ v).transpose(1, 2).reshape(B, N, attn.attn_dim)
    x = attn.norm(x)
    if getattr(attn, 'gate', None) is not None:
        x = x * attn.gate(attn_input).sigmoid()
    return attn.proj_drop(attn.proj(x))


def masked_block(block, x, halted):
    """Official `Block_ACT.forward_act` on a timm 1.0 `Block`: LN inputs and outputs of halted rows are zeroed
    (redundant since LN is per token, kept for parity), halted keys are masked in attention."""
    keep = (1. - halted).unsqueeze(-1)
    x = x + block.drop_path1(block.ls1(masked_attention(block.attn, block.norm1(x * keep) * keep, halted)))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x * keep) * keep)))
    return x


def _is_plain_block(block):
    """A timm `Block` without layer scale, q/k norm or extra norms, with LayerNorms and GELU (every A-ViT model)."""
    attn, mlp = block.attn, block.mlp
    return (getattr(attn, 'gate', None) is None
            and all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm, mlp.norm, block.ls1,
                                                         block.ls2))
            and isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)
            and type(mlp.act) is nn.GELU)


def packed_block(block, x, key_padding_bias):
    """A timm `Block` in eval mode on packed active tokens; `key_padding_bias` (B,1,1,K) is PADDING_BIAS on padding
    keys, or None. A plain block runs as functional calls: the same kernels as the modules, a third less Python per
    block, which is a measurable share of a small block's time at batch 1 on a CPU."""
    attn, mlp = block.attn, block.mlp
    B, K, C = x.shape
    if key_padding_bias is not None:
        key_padding_bias = key_padding_bias.to(x.dtype)
    if not _is_plain_block(block):
        z = block.norm1(x)
        q, k, v = attn.qkv(z).reshape(B, K, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v, attn_mask=key_padding_bias)
        y = attn.norm(y.transpose(1, 2).reshape(B, K, attn.attn_dim))
        if getattr(attn, 'gate', None) is not None:
            y = y * attn.gate(z).sigmoid()
        x = x + block.ls1(attn.proj(y))
        return x + block.ls2(block.mlp(block.norm2(x)))
    n1, n2 = block.norm1, block.norm2
    y = F.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps)
    qkv = F.linear(y, attn.qkv.weight, attn.qkv.bias)
    q, k, v = qkv.view(B, K, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_bias)
    x = x + F.linear(y.transpose(1, 2).reshape(B, K, attn.attn_dim), attn.proj.weight, attn.proj.bias)
    y = F.layer_norm(x, n2.normalized_shape, n2.weight, n2.bias, n2.eps)
    y = F.gelu(F.linear(y, mlp.fc1.weight, mlp.fc1.bias), approximate=mlp.act.approximate)
    return x + F.linear(y, mlp.fc2.weight, mlp.fc2.bias)


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


class AdaptiveComputation:
    """A-ViT's token-level adaptive computation time, as a mixin of a timm VisionTransformer (or a subclass of one).

    gate_scale / gate_center: gamma and beta of the halting score (read at every forward, so the entry script may
    change them after construction, as the official file-name override does).
    prior_batch_axis_quirk: the official per-layer statistic is `mean(h[1:])`, which drops the first *image* of the
    batch and averages every token (issue NVlabs/A-ViT#4). False averages the patch tokens of every image instead.
    zip_tokens: in eval mode, use the zipped path that really removes halted tokens (default); False evaluates with
    the masked loop, which also records the per-layer halting statistics of the distributional prior.
    zip_pack_blocks: None packs the zipped path's sequence after every block (one host read of the token counts per
    block); a collection of block indices packs only after those blocks (one host read each), the halted tokens
    riding along as masked padding in between. See `forward_features_zipped`.
    register_slots: (first, end) sequence slots of register tokens, or None. Registers never halt: no head reads
    them, and the backbone was trained with them present in every block. The class (and distillation) token halts
    like any patch token, as in A-ViT, and its halting-weighted state is what the head reads.
    """
    zip_pack_blocks = None
    register_slots = None

    def _init_adaptive(self, gate_scale, gate_center, eps, prior_batch_axis_quirk, zip_tokens):
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
        return (x[..., 0] * self.gate_scale).sub_(self.gate_center).sigmoid_()

    def embed(self, x):
        return self.norm_pre(self._pos_embed(self.patch_embed(x)))

    def _reads_class_token_only(self):
        """The head classifies the class token's state alone (DeiT, CLIP, DINOv2): the zipped path then accumulates
        only that token's output."""
        return (self.global_pool == 'token' and self.attn_pool is None
                and getattr(self, 'dist_token', None) is None)

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
            if self.register_slots is not None:
                first, end = self.register_slots
                h = torch.cat([h[:, :first], torch.zeros_like(h[:, first:end]), h[:, end:]], dim=1)
            if self.prior_batch_axis_quirk:
                self.halting_score_layer.append(torch.mean(h[1:]))
            else:
                self.halting_score_layer.append(torch.mean(h[:, self.num_prefix_tokens:]))
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

    @staticmethod
    @torch.compiler.disable
    def _host_read(t):
        """The zipped loop's one wait for the device: a small integer tensor's values as Python ints. Never traced
        (see `_gather_packed_eager`)."""
        return t.tolist()

    @torch.no_grad()
    def forward_features_zipped(self, x, class_token_only=False):
        """Inference with halted tokens removed; same halting rule and results as the masked loop.

        Only the active tokens travel from block to block, with their cumulative score c and their flat position in
        the B*N grid; the rest of the masked loop's bookkeeping is done once, after the last block, on the
        concatenated per-block records. At batch 1 on a CPU each small op costs about as much as the arithmetic a
        halted token saves, so the loop keeps to about ten small ops per block. Identities of the masked loop that
        make this possible: while a token goes on, its remainder is R = 1 - c; its depth counter (1, plus one for
        every block it does not halt in) is the number of blocks it went through; its ponder cost is that depth plus
        the remainder it had when it halted.

        Host synchronisation: the next block's sequence length is a count of tokens that go on, which a GPU must
        hand to the host. With `zip_pack_blocks` None that is one read per block boundary (`_host_read` of the
        fewest and most counts at batch > 1, `nonzero` at batch 1), at most depth - 1 per forward, and fewer when
        every token halts early. With a collection of blocks, only those read (at most len(zip_pack_blocks) per
        forward); after the other blocks the tokens are re-packed at the same length, halted ones as masked padding.
        Only the per-block packing reproduces the masked loop's float sums bit for bit: the kernels' summation
        order depends on the sequence length, so a longer padded sequence moves results by float rounding.

        class_token_only: return only the class token's state (B, 1, C), all the head reads; the depth counters and
        ponder costs are still those of every token.
        """
        x = self.embed(x)
        B, N, C = x.shape
        threshold = 1 - self.eps
        depth = len(self.blocks)
        pack_every_block = self.zip_pack_blocks is None
        states = x
        pos = torch.arange(B * N, device=x.device).view(B, N)
        c = x.new_zeros(B, N)
        bias = None
        outputs, positions, scores, before = [], [], [], []
        for i, block in enumerate(self.blocks):
            y = packed_block(block, states, bias)
            if i == depth - 1:
                h = torch.ones_like(c)
            else:
                h = self.halting_score(y)
                if self.register_slots is not None:
                    first, end = self.register_slots
                    slot = pos % N
                    h = h.masked_fill((slot >= first) & (slot < end), 0.)
            outputs.append(y)
            positions.append(pos)
            scores.append(h)
            before.append(c)
            c = c + h
            if i == depth - 1:
                break
            going_on = c < threshold
            if not pack_every_block and i not in self.zip_pack_blocks:
                states, pos, c, bias = self._gather_packed(y, pos, c, going_on, c.shape[1], True)
                continue
            if torch.compiler.is_compiling():
                states, pos, c, bias = self._pack_without_host_sync(y, pos, c, going_on)
                continue
            if B == 1 and pack_every_block:  # no padding: keep the tokens that go on, in order
                keep = going_on.view(-1).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                if keep.numel() < c.shape[1]:  # index_select: a quarter of advanced indexing's overhead
                    states, pos, c = y.index_select(1, keep), pos.index_select(1, keep), c.index_select(1, keep)
                else:
                    states = y
                bias = None
                continue
            fewest, count = self._host_read(torch.stack(torch.aminmax(going_on.sum(1))))
            if count == 0:
                break
            if fewest == states.shape[1]:  # nothing halted in this block
                states = y
                continue
            # Every image has `count` tokens that go on exactly when the fewest equals the most: no padding then.
            states, pos, c, bias = self._gather_packed_eager(y, pos, c, going_on, count, fewest < count)
        # The masked loop's per-block updates, for every (block, token) pair at once.
        sizes = [p.numel() for p in positions]
        flat_positions = torch.cat([p.reshape(-1) for p in positions])
        h = torch.cat([t.reshape(-1) for t in scores])
        c_before = torch.cat([t.reshape(-1) for t in before])
        c = c_before + h  # the same additions as in the loop, so the same halting decisions
        reached = c > threshold
        not_reached = c < threshold
        remainder = torch.where(reached, 1 - c_before, 0.)  # R * reached, with R = 1 - c before this block
        weight = remainder + h * not_reached
        if class_token_only:
            # Slot 0 of an image holds its class token for as long as that token is active (the packing is stable).
            is_class = torch.stack([p[:, 0] for p in positions]) == torch.arange(0, B * N, N, device=x.device)
            w = torch.stack([t.view(B, -1)[:, 0] for t in weight.split(sizes)]) * is_class  # (blocks, B)
            output = (torch.stack([y[:, 0] for y in outputs]) * w.unsqueeze(-1)).sum(0).unsqueeze(1)  # (B, 1, C)
        else:
            # Block by block, in place: one (sum K, C) temporary costs more in fresh pages than these few calls.
            output = x.new_zeros(B * N, C)
            for y, p, w in zip(outputs, flat_positions.split(sizes), weight.split(sizes)):
                output.index_add_(0, p, y.reshape(-1, C).mul_(w.unsqueeze(-1)))
            output = output.view(B, N, C)
        counter = x.new_ones(B * N).index_add_(0, flat_positions, not_reached.to(x.dtype))
        remainder = x.new_zeros(B * N).index_add_(0, flat_positions, remainder)
        self.counter_token = counter.view(B, N)
        self.rho_token = self.counter_token + remainder.view(B, N)
        self.halting_score_layer = []
        return self.norm(output)

    @staticmethod
    def _gather_packed(y, pos, c, going_on, length, padded):
        """Each image's tokens that go on packed to the left (a stable sort keeps their order), cut to `length`.
        A padding slot repeats a real position with c = 1: it halts with remainder 1 - c = 0 exactly, so every
        contribution it makes to the bookkeeping is zero; as a key it gets PADDING_BIAS (when `padded`)."""
        order = torch.sort((~going_on).to(torch.int8), dim=1, stable=True).indices[:, :length]
        valid = going_on.gather(1, order)
        states = y.gather(1, order.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        c = torch.where(valid, c.gather(1, order), 1.)
        bias = None
        if padded:
            bias = torch.zeros(valid.shape, dtype=y.dtype, device=y.device)
            bias = bias.masked_fill(~valid, PADDING_BIAS)[:, None, None, :]
        return states, pos.gather(1, order), c, bias

    # The per-block packing after a host read runs only eagerly: a compiled loop packs without reading the host, and
    # where dynamo's defaults make it fall back to eager for the loop, these calls must not become graphs of their own.
    _gather_packed_eager = staticmethod(torch.compiler.disable(_gather_packed.__func__))

    @staticmethod
    def _pack_without_host_sync(y, pos, c, going_on):
        """The loop's packing step for torch.compile: no branch on the data, so the graph does not break. The packed
        length stays a tensor until it sizes the slice (an unbacked size: compile with
        `torch._dynamo.config.capture_scalar_outputs = True`). It is at least 1: when every token has halted a lone
        padding slot (c = 1, every key masked) goes on, and like all padding it adds exactly zero to every output,
        counter and ponder cost. The padding mask is built even when nothing is padded, and spelled out over the
        query axis so that no broadcast has to be decided on the unbacked length."""
        count = going_on.sum(1).max().clamp(min=1).item()
        torch._check(count >= 1)
        torch._check(count <= going_on.shape[1])
        order = torch.sort((~going_on).to(torch.int8), dim=1, stable=True).indices.narrow(1, 0, count)
        valid = going_on.gather(1, order)
        states = y.gather(1, order.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        c = torch.where(valid, c.gather(1, order), 1.)
        bias = torch.zeros(valid.shape, dtype=y.dtype, device=y.device).masked_fill(~valid, PADDING_BIAS)
        return states, pos.gather(1, order), c, bias[:, None, None, :].expand(-1, -1, count, -1)

    def forward_features(self, x):
        if self.zip_tokens and not self.training:
            return self.forward_features_zipped(x)
        return self.forward_features_act_token(x)

    def forward_head(self, x, pre_logits=False):
        if self._reads_class_token_only():
            # Only the class token's halting-weighted state is classified (no head dropout in the original).
            x = self.fc_norm(x[:, 0])
            return x if pre_logits else self.head(x)
        # Other heads (average or attention pooling, a distillation head) read every token's halting-weighted state
        # through the backbone's own pooling: a halted token contributes the state it halted with.
        return super().forward_head(x, pre_logits=pre_logits)

    def forward(self, x):
        if self.zip_tokens and not self.training:
            return self.forward_head(self.forward_features_zipped(x, class_token_only=self._reads_class_token_only()))
        return self.forward_head(self.forward_features(x))


class AdaptiveVisionTransformer(AdaptiveComputation, VisionTransformer):
    """timm ViT in A-ViT's DeiT layout (one class token classified, no registers); see `AdaptiveComputation`."""

    def __init__(self, gate_scale=10., gate_center=30., eps=0.01, prior_batch_axis_quirk=True, zip_tokens=True,
                 **kwargs):
        super().__init__(**kwargs)
        assert self.cls_token is not None and self.reg_token is None and not self.no_embed_class, \
            'A-ViT needs a single class token and a position embedding that covers it'
        self._init_adaptive(gate_scale, gate_center, eps, prior_batch_axis_quirk, zip_tokens)


def adaptive_from_timm(model, gate_scale=10., gate_center=30., eps=0.01, prior_batch_axis_quirk=True,
                       zip_tokens=True):
    """Turn a timm VisionTransformer of a supported family (shared.backbones) into an A-ViT model in place; its
    weights and parameter names stay. Prefix tokens: the class (and distillation) token halts as in A-ViT, registers
    never halt. Models without a class token classify their own pooling (average or attention pooling) of the
    tokens' halting-weighted states. Refused, with the reason: rotary or window attention, no pooling."""
    from shared.backbones import require_supported
    backbone = require_supported(model, 'A-ViT', merges=False)
    if not isinstance(model, AdaptiveComputation):
        model.__class__ = type('ACT' + type(model).__name__, (AdaptiveComputation, type(model)), {})
    model._init_adaptive(gate_scale, gate_center, eps, prior_batch_axis_quirk, zip_tokens)
    if backbone.num_registers:
        model.register_slots = (backbone.num_prefix_tokens - backbone.num_registers, backbone.num_prefix_tokens)
    return model


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
