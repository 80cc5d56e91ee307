"""The project's one FLOPs convention: analytic multiply-accumulates of a ViT, driven by the token counts a forward
actually used (the field's "GFLOPs" are MACs).

Per block: attention on the tokens that enter it (4·N·C² for qkv + proj, 2·N²·C for q·kᵀ and attn·v), then the MLP on
the tokens that remain after the block's reduction (2·mlp_ratio·N'·C²). The patch embedding is counted with the class
slot included (N = P + 1), as DiffRate does, and the head as C·classes. LayerNorm, softmax, GELU, biases and the
reduction ops themselves are not counted. DeiT-T/S/B at 224: 1.254 / 4.599 / 17.564 GFLOPs.
"""
import torch


def vit_macs(attn_tokens, mlp_tokens=None, *, embed_dim, patch_size, num_patches, num_classes=1000, in_chans=3,
             mlp_ratio=4.0, num_prefix_tokens=1):
    """MACs of one image through a ViT.

    attn_tokens[i]: tokens entering block i's attention; mlp_tokens[i]: tokens in block i's MLP (defaults to
    attn_tokens, i.e. no reduction inside the block). Counts may be floats (averages over images, or the
    differentiable counts of a search)."""
    if mlp_tokens is None:
        mlp_tokens = attn_tokens
    if len(mlp_tokens) != len(attn_tokens):
        raise ValueError(f'{len(attn_tokens)} attention token counts but {len(mlp_tokens)} MLP token counts')
    C = embed_dim
    macs = (num_patches + num_prefix_tokens) * C * in_chans * patch_size * patch_size
    for n_attn, n_mlp in zip(attn_tokens, mlp_tokens):
        macs = macs + 4 * n_attn * C * C + 2 * n_attn * n_attn * C
        macs = macs + 2 * mlp_ratio * n_mlp * C * C
    return macs + C * num_classes


def vit_dims(model):
    """(embed_dim, patch_size, num_patches, num_classes, in_chans, mlp_ratio, depth, num_prefix_tokens) of a timm-style
    VisionTransformer."""
    pe = model.patch_embed
    patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else pe.patch_size
    blk = model.blocks[0]
    mlp_ratio = blk.mlp.fc1.out_features / blk.mlp.fc1.in_features
    head = getattr(model, 'head', None)
    num_classes = head.out_features if isinstance(head, torch.nn.Linear) else 0
    return dict(embed_dim=model.embed_dim, patch_size=patch, num_patches=pe.num_patches, num_classes=num_classes,
                in_chans=pe.proj.in_channels, mlp_ratio=mlp_ratio,
                num_prefix_tokens=getattr(model, 'num_prefix_tokens', 1)), len(model.blocks)


def model_macs(model, attn_tokens=None, mlp_tokens=None):
    """vit_macs for a timm-style ViT; without token counts, the uncompressed model."""
    dims, depth = vit_dims(model)
    if attn_tokens is None:
        attn_tokens = [dims['num_patches'] + dims['num_prefix_tokens']] * depth
    return vit_macs(attn_tokens, mlp_tokens, **dims)


def flop_counter_macs(model, x):
    """MACs per image of `model(x)` as torch's FlopCounterMode counts them (its FLOPs are 2 per MAC).

    timm's fused attention (F.scaled_dot_product_attention) runs a CPU kernel the counter has no formula for, so the
    explicit q·kᵀ / attn·v path is used while counting. The counter sees the patch embedding without the class slot
    that `vit_macs` counts (C·in_chans·p² MACs less). The parameters are frozen while counting: with trainable weights
    the counter fails inside timm's attention pool ('map' pooling: SigLIP)."""
    from torch.utils.flop_counter import FlopCounterMode
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, 'fused_attn')]
    trainable = [p for p in model.parameters() if p.requires_grad]
    counter = FlopCounterMode(display=False)
    try:
        for m, _ in fused:
            m.fused_attn = False
        for p in trainable:
            p.requires_grad_(False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        for m, flag in fused:
            m.fused_attn = flag
        for p in trainable:
            p.requires_grad_(True)
    return counter.get_total_flops() / 2 / x.shape[0]
