"""LAT's samplers of per-layer token counts ("genes") and of the layers to run (LayerDrop), and TAVT's patch drop on a
timm VisionTransformer.

The samplers draw from `numpy.random` in the original's order, so a seeded run gives the original's sequence.

`apply_patch_drop(model)` runs a gene on any backbone `shared.backbones` supports (class token or none, registers,
layer scale, pre-norm, token / average / attention pooling): in each block, after the attention residual and before
the MLP, the prefix tokens (class, registers) stay at the front and the patch tokens that received the most attention
(softmax probabilities summed over heads and queries, as in `tavt.models.modeling`) fill the rest of the gene's count.
The model's own pooling then sees the kept tokens only (average or attention pooling over them). TAVT's own models
(ViT-pytorch, `tavt.models.modeling`) are not touched by this.
"""
from typing import Optional, Sequence

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from shared.backbones import require_supported
from tavt.models.modeling import GeneError


def _shrink_rule(length_drop_prob, length_drop_ratio, length_drop_ratio_bound):
    """How a layer in the layer configuration shrinks the running length n, by the first option that is set."""
    if length_drop_prob is not None:  # each token dropped independently
        return lambda n: n - np.random.binomial(n, length_drop_prob)
    if length_drop_ratio is not None:  # a fixed fraction, the kept count rounded up
        keep = 1 - length_drop_ratio
        return lambda n: int(np.ceil(n * keep))
    if length_drop_ratio_bound is not None:  # a uniform count between the bound's shortest length and n
        keep = 1 - length_drop_ratio_bound
        return lambda n: np.random.randint(int(np.ceil(n * keep)), n + 1)
    return lambda n: n


def sample_length_configuration(max_seq_length, num_hidden_layers, layer_config=None, length_drop_prob=None,
                                length_drop_ratio=None, length_drop_ratio_bound=None, min_length=2):
    """Non-increasing token counts, one per layer, starting from `max_seq_length` (class token included).

    A layer outside `layer_config` keeps the running length. Otherwise the length shrinks by the first rule given:
    a binomial draw (`length_drop_prob`), a fixed ratio (`length_drop_ratio`, ceil(len * (1 - ratio))), or a uniform
    integer in [ceil(len * (1 - bound)), len] (`length_drop_ratio_bound`). Never below `min_length`."""
    shrink = _shrink_rule(length_drop_prob, length_drop_ratio, length_drop_ratio_bound)
    lengths = [max_seq_length]
    for layer in range(num_hidden_layers):
        n = lengths[-1]
        runs = layer_config is None or layer in layer_config
        lengths.append(max(int(shrink(n) if runs else n), min_length))
    return tuple(lengths[1:])


def sample_layer_configuration(num_hidden_layers, layer_dropout_prob=None, layer_dropout=None,
                               layer_dropout_bound=None):
    """The indices of the layers to run, or None for all.

    `layer_dropout_prob`: each layer independently kept when a uniform draw >= prob (LayerDrop; it wins whenever it
    is set, as it always is from TAVT's command line). `layer_dropout`: drop the last k layers. `layer_dropout_bound`:
    drop the last k layers, k uniform in [0, bound]."""
    if layer_dropout_prob is not None:
        return tuple(i for i in range(num_hidden_layers) if np.random.random() >= layer_dropout_prob)
    if layer_dropout is not None:
        layer_dropout = min(layer_dropout, num_hidden_layers - 1)
        return tuple(range(num_hidden_layers - layer_dropout))
    if layer_dropout_bound is not None:
        layer_dropout_bound = min(layer_dropout_bound, num_hidden_layers - 1)
        return tuple(range(num_hidden_layers - np.random.randint(0, layer_dropout_bound + 1)))
    return None


# ------------------------------------------------------------------------------------- patch drop on a timm ViT
def attention_with_received(attn, x: torch.Tensor):
    """timm Attention's output for x `[B, N, C]` and the attention each token received, `[B, N]`: the post-softmax
    probabilities summed over heads and queries. The explicit softmax is needed for the probabilities, so the fused
    kernel is not used here."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, 'gate', None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (attn.attn_drop(probs) @ v).transpose(1, 2).reshape(B, N, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), probs.sum(dim=(1, 2))


def keep_most_attended(x: torch.Tensor, received: torch.Tensor, length: int, num_prefix: int) -> torch.Tensor:
    """The first `num_prefix` tokens of x, in place, then the `length - num_prefix` other tokens with the most received
    attention, most attended first (as `topk` orders them; TAVT's order for one class token)."""
    chosen = received[:, num_prefix:].topk(length - num_prefix, dim=1).indices + num_prefix
    prefix = torch.arange(num_prefix, device=x.device).expand(x.shape[0], -1)
    keep = torch.cat((prefix, chosen), dim=1)
    return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def block_with_drop(block, x: torch.Tensor, length: int, num_prefix: int) -> torch.Tensor:
    """One timm Block that keeps `length` tokens between its attention and its MLP; with nothing to drop, the block's
    own forward (bit for bit timm's)."""
    if length >= x.shape[1]:
        return block(x)
    attn_out, received = attention_with_received(block.attn, block.norm1(x))
    x = x + block.drop_path1(block.ls1(attn_out))
    x = keep_most_attended(x, received, length, num_prefix)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


_DROP_CLASSES = {}


def _patch_drop_class(transformer_class):
    if transformer_class in _DROP_CLASSES:
        return _DROP_CLASSES[transformer_class]

    class PatchDropVisionTransformer(transformer_class):
        """The timm model running `self.length_config` (one token count per block, prefix tokens included; None:
        the plain model)."""

        def set_length_config(self, length_config: Optional[Sequence[int]]):
            self.length_config = check_gene(self, length_config)

        def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
            if self.length_config is None:
                return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
            if attn_mask is not None or is_causal:
                raise NotImplementedError('the patch drop changes the token count; attention masks are not supported')
            x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
            for block, length in zip(self.blocks, self.length_config):
                x = block_with_drop(block, x, length, self.num_prefix_tokens)
            return self.norm(x)

    PatchDropVisionTransformer.__name__ = 'PatchDrop' + transformer_class.__name__
    PatchDropVisionTransformer.__qualname__ = PatchDropVisionTransformer.__name__
    _DROP_CLASSES[transformer_class] = PatchDropVisionTransformer
    return PatchDropVisionTransformer


def num_tokens(model: VisionTransformer) -> int:
    """Tokens entering the first block: patches plus prefix tokens."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


def check_gene(model: VisionTransformer, length_config: Optional[Sequence[int]]):
    """The gene as a tuple, or GeneError: one count per block, non-increasing, at most the token count, and keeping
    every prefix token plus at least one patch token (the class token alone suffices for class-token pooling)."""
    if length_config is None:
        return None
    gene = tuple(int(v) for v in length_config)
    if len(gene) != len(model.blocks):
        raise GeneError(f'length configuration {gene} has {len(gene)} entries; the model has {len(model.blocks)} '
                        'blocks')
    prefix = model.num_prefix_tokens
    least = max(prefix, 1) if model.global_pool == 'token' else prefix + 1
    previous = num_tokens(model)
    for i, length in enumerate(gene):
        if length > previous:
            raise GeneError(f'length configuration {gene}: block {i} keeps {length} tokens, more than the {previous} '
                            'that enter it (dropped tokens cannot come back)')
        if length < least:
            raise GeneError(f'length configuration {gene}: block {i} keeps {length} tokens; the {prefix} prefix '
                            f'token(s) always stay and pooling needs {least} in all')
        previous = length
    return gene


def apply_patch_drop(model: VisionTransformer, length_config: Optional[Sequence[int]] = None) -> VisionTransformer:
    """TAVT's patch drop on a timm ViT, in place; `model.set_length_config(gene)` changes the gene (None: no drop).
    Backbones it cannot honour raise `shared.backbones.UnsupportedBackbone` naming the reason."""
    require_supported(model, 'TAVT', merges=False)
    model.__class__ = _patch_drop_class(model.__class__)
    model.set_length_config(length_config)
    return model


def gene_token_counts(model: VisionTransformer, length_config: Optional[Sequence[int]]):
    """(attention tokens, MLP tokens) per block under a gene, for shared.flops.vit_macs: block i's attention sees the
    tokens block i-1 kept, its MLP the gene's count."""
    n = num_tokens(model)
    gene = check_gene(model, length_config) or (n,) * len(model.blocks)
    return [n] + list(gene[:-1]), list(gene)
