"""DiffRate patch for timm ViTs: DeiT (class-token classifier), MAE fine-tuned ViTs (size-weighted global average
pool) and the families of shared.backbones (registers, no class token with average or attention pooling, layer
scale, pre-norm).

Every block gets a prune proxy and a merge proxy. After attention the patch tokens are sorted by importance: the
attention the class token pays them, or, in a model without a class token, the mean attention they receive from
every token (all heads, all queries). Inference then drops the tail (prune) and folds the next-least-important tokens
into their most similar survivors (merge). The prefix tokens (class, distillation, registers) stay first and are
never pruned, merged into or merged. The search never removes tokens: it masks keys in the attention softmax
instead, so the token masks carry gradients to the proxies.
"""
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from diffrate.flops import vit_gflops, vit_training_gflops
from diffrate.merge import merge_by_similarity
from diffrate.proxy import KeptNumberProxy
from shared.backbones import pool_features, require_supported

SOFTMAX_EPS = 1e-6


def softmax_with_policy(attn, policy, eps=SOFTMAX_EPS):
    """Softmax over keys where masked keys (policy 0) get no weight except on the diagonal; computed in fp32.
    Masked keys keep a tiny eps/N share so that gradients through the straight-through policy stay finite."""
    B, N = policy.shape
    key_policy = policy.reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=key_policy.dtype, device=key_policy.device).view(1, 1, N, N)
    key_policy = key_policy + (1.0 - key_policy) * eye
    max_logit = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = attn - max_logit
    attn = attn.to(torch.float32).exp_() * key_policy.to(torch.float32)
    attn = (attn + eps / N) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_logit)


def _heads(m, x):
    """q, k, v of a timm attention module as (B, heads, N, head_dim), q/k normalised where the module does."""
    B, N, C = x.shape
    q, k, v = m.qkv(x).reshape(B, N, 3, m.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if getattr(m, 'q_norm', None) is not None:
        q, k = m.q_norm(q), m.k_norm(k)
    return q, k, v


def _merge_heads(m, x):
    """(B, heads, N, head_dim) -> the module's output projection of (B, N, C)."""
    B, _, N, _ = x.shape
    x = x.transpose(1, 2).reshape(B, N, -1)
    if getattr(m, 'norm', None) is not None:
        x = m.norm(x)
    return m.proj_drop(m.proj(x))


def attention_with_size(attn_module, x, size=None, mask=None):
    """Explicit multi-head self-attention of a timm attention module (its qkv / proj weights) with proportional
    attention (log of the key sizes added to the logits), the masked softmax in training, and the attention map
    returned alongside the output. No fused SDPA: the map is the importance metric."""
    m = attn_module
    q, k, v = _heads(m, x)
    attn = (q @ k.transpose(-2, -1)) * m.scale
    if size is not None:
        attn = attn + size.log()[:, None, None, :, 0]
    if m.training and mask is not None:
        attn = softmax_with_policy(attn, mask)
    else:
        attn = attn.softmax(dim=-1)
    attn = m.attn_drop(attn)
    return _merge_heads(m, attn @ v), attn


def fused_attention_with_class_row(attn_module, x, size=None):
    """Inference form of `attention_with_size`: the output from fused attention (no N x N map kept), and only the
    class token's row of the attention map, (B, heads, 1, N), which is all the token ordering reads. The row is
    the same softmax of q_cls . K^T * scale (+ log sizes) as the full map's first row."""
    m = attn_module
    q, k, v = _heads(m, x)
    size_bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)
    cls_logits = (q[:, :, :1] @ k.transpose(-2, -1)) * m.scale
    if size_bias is not None:
        cls_logits = cls_logits + size_bias
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias, scale=m.scale)
    return _merge_heads(m, x), cls_logits.softmax(dim=-1)


class DiffRateAttention(Attention):
    """timm ViT Attention returning (output, attention map), with proportional attention and the search's mask.
    Under no_grad in eval mode the map is the class token's row only (fused attention for the output) when that row
    is all the ordering reads (`class_row_only`); the search and training keep the explicit map, whose every row the
    masked softmax needs, and so does a model without a class token, whose ordering reads every row."""
    class_row_only = True

    def forward(self, x, size=None, mask=None):
        if self.class_row_only and not self.training and not torch.is_grad_enabled():
            return fused_attention_with_class_row(self, x, size)
        return attention_with_size(self, x, size, mask)


def sort_by_importance(attn, prefix=1, class_token=True, query_weight=None):
    """Permutation (B, N) keeping the `prefix` tokens first, in place, and ordering the patch tokens by importance,
    descending: the class token's attention to them averaged over heads (`attn` the map (B, heads, N, N) or its
    class row (B, heads, 1, N)); without a class token, the attention they receive averaged over queries and heads
    (`query_weight` (B, N): 0 for the queries the search has masked out, which no longer exist)."""
    B = attn.shape[0]
    if class_token:
        score = attn[:, :, 0, prefix:].mean(dim=1)
    elif query_weight is None:
        score = attn[:, :, :, prefix:].mean(dim=2).mean(dim=1)
    else:
        w = query_weight.detach()[:, None, :, None]
        score = ((attn[:, :, :, prefix:] * w).sum(dim=2) / w.sum(dim=2)).mean(dim=1)
    _, order = torch.sort(score, descending=True)
    head = torch.arange(prefix, device=order.device, dtype=order.dtype).expand(B, prefix)
    return torch.cat((head, order + prefix), dim=1)


def gather_tokens(t, idx):
    return torch.gather(t, dim=1, index=idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))


def prefixed_proxy(patch_number, granularity, prefix):
    """A kept-number proxy whose numbers count `prefix` tokens ahead of the patches (the proxy's class-token offset,
    widened to class + registers, or 0 without prefix tokens), which no candidate can remove."""
    proxy = KeptNumberProxy(patch_number, granularity, class_token=prefix > 0)
    if prefix > 1:
        proxy.class_token_num = prefix
        with torch.no_grad():
            proxy.update_kept_token_number()
    return proxy


class DiffRateBlock(Block):
    """attention -> residual -> sort -> prune -> merge -> MLP -> residual."""

    def introduce_diffrate(self, patch_number, prune_granularity, merge_granularity, prefix=1):
        self.prune_ddp = prefixed_proxy(patch_number, prune_granularity, prefix)
        self.merge_ddp = prefixed_proxy(patch_number, merge_granularity, prefix)

    def forward(self, x):
        info = self._diffrate_info
        B = x.shape[0]
        if not info['reorder']:
            # a schedule that removes nothing anywhere: the unpatched block (timm's token order and attention)
            x = x + self.drop_path1(self.ls1(Attention.forward(self.attn, self.norm1(x))))
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x_attn, attn = self.attn(self.norm1(x), info['size'], mask=info['mask'])
        x = x + self.drop_path1(self.ls1(x_attn))

        prefix = info['prefix']
        idx = sort_by_importance(attn, prefix, info['class_token'], info['mask'] if self.training else None)
        x = gather_tokens(x, idx)
        info['size'] = gather_tokens(info['size'], idx)
        if info['trace_source']:
            info['source'] = gather_tokens(info['source'], idx)

        if self.training:
            mask = torch.gather(info['mask'], dim=1, index=idx)
            alive = info['alive']
            prune_kept = self.prune_ddp.update_kept_token_number()
            info['prune_kept_num'].append(prune_kept)
            if self.prune_ddp.kept_token_number < alive:
                mask = mask * self.prune_ddp.token_mask(alive).expand(B, -1)
            mid = min(alive, self.prune_ddp.kept_token_number)

            merge_kept = self.merge_ddp.update_kept_token_number()
            info['merge_kept_num'].append(merge_kept)
            kept = self.merge_ddp.kept_token_number
            if kept < mid:
                x_tail, size_tail = x[:, mid:], info['size'][:, mid:]
                merge, similarity = merge_by_similarity(x[:, :mid].detach(), kept, prefix)
                x = merge(x[:, :mid], mode='mean', keep_sources=True)
                size = info['size']
                # sizes scaled by how similar a source is to its destination; clamped at 1 in the search only
                size = torch.cat((size[:, :kept], size[:, kept:mid] * similarity[..., None]), dim=1).clamp(1)
                size = merge(size, mode='sum', keep_sources=True)
                x = torch.cat([x, x_tail], dim=1)
                info['size'] = torch.cat([size, size_tail], dim=1)
                mask = mask * self.merge_ddp.token_mask(mid)
                mid = kept
            info['mask'] = mask
            info['alive'] = mid
        else:
            prune_kept = self.prune_ddp.kept_token_number
            x = x[:, :prune_kept]
            info['size'] = info['size'][:, :prune_kept]
            if info['trace_source']:
                info['source'] = info['source'][:, :prune_kept]
            kept = self.merge_ddp.kept_token_number
            if kept < x.shape[1]:
                merge, similarity = merge_by_similarity(x.detach(), kept, prefix)
                x = merge(x, mode='mean')
                size = info['size']
                # no clamp at inference (the reference's behaviour)
                size = torch.cat((size[:, :kept], size[:, kept:] * similarity[..., None]), dim=1)
                info['size'] = merge(size, mode='sum')
                if info['trace_source']:
                    info['source'] = merge(info['source'], mode='amax')
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class DiffRateModelMixin:
    """What every patched model offers: (logits, flops) forward, architecture parameters, schedule get/set."""

    def parameters(self, recurse=True):
        """The network's parameters only; the proxies' are `arch_parameters()` (the reference's split)."""
        return iter([p for n, p in self.named_parameters(recurse=recurse) if 'ddp' not in n])

    def arch_parameters(self):
        return iter([p for n, p in self.named_parameters() if 'ddp' in n])

    def proxies(self):
        return [m for m in self.modules() if isinstance(m, KeptNumberProxy)]

    def refresh_kept_numbers(self):
        """Recompute every proxy's integer kept number from its logits (after loading a search checkpoint)."""
        with torch.no_grad():
            for proxy in self.proxies():
                proxy.update_kept_token_number()


class DiffRateVisionTransformerMixin(DiffRateModelMixin):
    def forward(self, x, return_flop=True):
        B = x.shape[0]
        info = self._diffrate_info
        n = self.patch_embed.num_patches + info['prefix']
        # Sorting only serves the removal; when the schedule removes nothing the forward keeps timm's order.
        info['reorder'] = self.training or min(min(k) for k in self.get_kept_num()) < n
        info['size'] = torch.ones([B, n, 1], device=x.device)
        info['mask'] = torch.ones((B, n), device=x.device)
        info['alive'] = n
        info['prune_kept_num'] = []
        info['merge_kept_num'] = []
        if info['trace_source']:
            info['source'] = torch.eye(n, device=x.device)[None, ...].expand(B, n, n)
        x = super().forward(x)
        if not return_flop:
            return x
        flops = self.calculate_flop_training() if self.training else self.calculate_flop_inference()
        return x, flops

    def forward_head(self, x, pre_logits=False):
        if self._diffrate_info['size_weighted_pool']:
            # MAE: average of the non-class tokens weighted by how many patches each stands for
            size = self._diffrate_info['size']
            if self.training:
                weight = size * self._diffrate_info['mask'][..., None]
                x = (x * weight)[:, 1:, :].sum(dim=1) / weight[:, 1:, :].sum(dim=1).detach()
            else:
                x = (x * size)[:, 1:, :].sum(dim=1) / size[:, 1:, :].sum(dim=1)
            x = self.fc_norm(x)
            x = self.head_drop(x)
            return x if pre_logits else self.head(x)
        if (self.attn_pool is not None or self.global_pool == 'avg') and self._diffrate_info['reorder']:
            # the backbone's own pooling, each token weighted by its size; in the search a masked token weighs
            # (next to) nothing, and never exactly 0, whose log the attention pooling's bias could not take
            size = self._diffrate_info['size']
            if self.training:
                size = (size * self._diffrate_info['mask'][..., None]).clamp(min=torch.finfo(size.dtype).tiny)
            x = self.head_drop(pool_features(self, x, size))
            return x if pre_logits else self.head(x)
        return super().forward_head(x, pre_logits=pre_logits)

    def get_kept_num(self):
        return ([int(b.prune_ddp.kept_token_number) for b in self.blocks],
                [int(b.merge_ddp.kept_token_number) for b in self.blocks])

    def set_kept_num(self, prune_kept_numbers, merge_kept_numbers):
        depth = len(self.blocks)
        if prune_kept_numbers is None or len(prune_kept_numbers) != depth or len(merge_kept_numbers) != depth:
            raise ValueError(f'schedule of {None if prune_kept_numbers is None else len(prune_kept_numbers)} prune '
                             f'and {len(merge_kept_numbers)} merge numbers does not fit a {depth}-block model')
        for block, prune, merge in zip(self.blocks, prune_kept_numbers, merge_kept_numbers):
            block.prune_ddp.set_kept_number(prune)
            block.merge_ddp.set_kept_number(merge)

    def _flops_geometry(self):
        return self.embed_dim, self.patch_embed.patch_size[0], self.patch_embed.num_patches, self.num_classes

    def _flops_layout(self):
        """What the FLOPs formulas need beyond the geometry: prefix tokens, MLP ratio, input channels."""
        return dict(num_prefix_tokens=info_prefix(self), mlp_ratio=self.blocks[0].mlp.fc1.out_features / self.embed_dim,
                    in_chans=self.patch_embed.proj.in_channels)

    def calculate_flop_training(self):
        info = self._diffrate_info
        return vit_training_gflops(*self._flops_geometry(), info['prune_kept_num'], info['merge_kept_num'],
                                   **self._flops_layout()) * 1e9

    def calculate_flop_inference(self):
        return vit_gflops(*self._flops_geometry(), *self.get_kept_num(), **self._flops_layout()) * 1e9


def info_prefix(model):
    return model._diffrate_info['prefix']


def apply_patch(model: VisionTransformer, prune_granularity=1, merge_granularity=1, trace_source=False,
                non_compressed_blocks=(0,), size_weighted_pool=False):
    """Patch a timm ViT in place. Blocks listed in `non_compressed_blocks` (negative indices count from the end)
    get a single candidate equal to all patches, so they never compress. Backbones whose token order matters
    (rotary or window attention) or whose pooling has no size-weighted form are refused (shared.backbones)."""
    backbone = require_supported(model, 'DiffRate', merges=True)
    prefix = backbone.num_prefix_tokens
    model.__class__ = type('DiffRate' + model.__class__.__name__,
                           (DiffRateVisionTransformerMixin, model.__class__), {})
    model._diffrate_info = {
        'size': None, 'mask': None, 'source': None, 'alive': None,
        'class_token': backbone.has_class_token, 'prefix': prefix, 'reorder': True,
        'trace_source': trace_source, 'size_weighted_pool': size_weighted_pool,
        'prune_kept_num': [], 'merge_kept_num': [],
    }
    depth = len(model.blocks)
    fixed = {i % depth for i in non_compressed_blocks}
    patches = model.patch_embed.num_patches
    for index, block in enumerate(model.blocks):
        block.__class__ = DiffRateBlock
        if index in fixed:
            block.introduce_diffrate(patches, patches + 1, patches + 1, prefix)
        else:
            block.introduce_diffrate(patches, prune_granularity, merge_granularity, prefix)
        block._diffrate_info = model._diffrate_info
        block.attn.__class__ = DiffRateAttention
        block.attn.class_row_only = backbone.has_class_token
    return model


def apply_deit_patch(model, prune_granularity=1, merge_granularity=1, trace_source=False):
    return apply_patch(model, prune_granularity, merge_granularity, trace_source, non_compressed_blocks=(0,))


def apply_mae_patch(model, prune_granularity=1, merge_granularity=1, trace_source=False):
    """MAE: first and last block uncompressed, size-weighted global pool (when the model pools)."""
    pool = getattr(model, 'global_pool', '') == 'avg'
    return apply_patch(model, prune_granularity, merge_granularity, trace_source,
                       non_compressed_blocks=(0, -1), size_weighted_pool=pool)
