"""DiffRate's analytic FLOPs (spec section 5): multiply-accumulates of the main matmuls, reported as "FLOPs".

`*_gflops` evaluate a fixed schedule exactly (integers); `*_training_gflops` take this forward's differentiable kept
numbers and use the reference's straight-through min, so the penalty's gradient is the reference's.
"""
import torch

from diffrate.proxy import min_ste
from shared.flops import vit_macs

# CAFormer-S36 geometry used by its FLOPs model
CAFORMER_STRIDES = (4, 2, 2, 2)
CAFORMER_DOWNSAMPLE_KERNELS = (7, 3, 3, 3)
CAFORMER_SEPCONV_KERNEL = 7


def vit_token_counts(tokens, prune_kept, merge_kept, running_min=min):
    """Tokens entering each block's attention and tokens in its MLP, from `tokens` entering block 0:
    N_{i+1} = min(N_i, prune_i, merge_i)."""
    n = tokens
    attn_tokens, mlp_tokens = [], []
    for prune, merge in zip(prune_kept, merge_kept):
        attn_tokens.append(n)
        n = running_min(n, prune, merge)
        mlp_tokens.append(n)
    return attn_tokens, mlp_tokens


def vit_gflops(embed_dim, patch_size, num_patches, num_classes, prune_kept, merge_kept, **layout):
    """GFLOPs of a ViT under a (prune, merge) schedule, both counting the prefix tokens; exact (integer token
    counts). layout: num_prefix_tokens (default 1, the class token), mlp_ratio (4), in_chans (3)."""
    prefix = layout.get('num_prefix_tokens', 1)
    attn, mlp = vit_token_counts(num_patches + prefix, [int(v) for v in prune_kept], [int(v) for v in merge_kept])
    return vit_macs(attn, mlp, embed_dim=embed_dim, patch_size=patch_size, num_patches=num_patches,
                    num_classes=num_classes, **layout) / 1e9


def vit_training_gflops(embed_dim, patch_size, num_patches, num_classes, prune_kept, merge_kept, **layout):
    """Differentiable GFLOPs from this forward's kept-number tensors; float32, outside autocast."""
    device = prune_kept[0].device
    with torch.autocast(device.type, enabled=False):
        start = torch.tensor(float(num_patches + layout.get('num_prefix_tokens', 1)), device=device)
        attn, mlp = vit_token_counts(start, [k.float() for k in prune_kept], [k.float() for k in merge_kept],
                                     running_min=min_ste)
        macs = vit_macs(attn, mlp, embed_dim=embed_dim, patch_size=patch_size, num_patches=num_patches,
                        num_classes=num_classes, **layout)
    return macs / 1e9


def _caformer_stages(dims, depths, input_size=224):
    resolution = input_size
    for s, depth in enumerate(depths):
        resolution //= CAFORMER_STRIDES[s]
        n = resolution * resolution
        cin = 3 if s == 0 else dims[s - 1]
        yield s, n, cin, dims[s], depth


def caformer_gflops(dims, depths, num_classes, merge_kept, input_size=224):
    """GFLOPs of CAFormer whose attention stages (the last two) keep `merge_kept` tokens per block (no class
    token). The head is approximated as 8 * C * classes, as the reference does."""
    macs = 0
    merge_iter = iter(merge_kept)
    for s, n, cin, C, depth in _caformer_stages(dims, depths, input_size):
        macs += n * C * CAFORMER_DOWNSAMPLE_KERNELS[s] ** 2 * cin
        if s < 2:
            macs += depth * (12 * n * C * C + 2 * CAFORMER_SEPCONV_KERNEL ** 2 * n * C)
        else:
            for _ in range(depth):
                macs += 4 * n * C * C + 2 * n * n * C
                n = min(n, int(next(merge_iter)))
                macs += 8 * n * C * C
    macs += 8 * dims[-1] * num_classes
    return macs / 1e9


def caformer_training_gflops(dims, depths, num_classes, merge_kept, input_size=224):
    device = merge_kept[0].device
    macs = 0.
    merge_iter = iter(merge_kept)
    with torch.autocast(device.type, enabled=False):
        for s, n, cin, C, depth in _caformer_stages(dims, depths, input_size):
            macs = macs + n * C * CAFORMER_DOWNSAMPLE_KERNELS[s] ** 2 * cin
            if s < 2:
                macs = macs + depth * (12 * n * C * C + 2 * CAFORMER_SEPCONV_KERNEL ** 2 * n * C)
            else:
                n = torch.tensor(float(n), device=device)
                for _ in range(depth):
                    macs = macs + 4 * n * C * C + 2 * n * n * C
                    merge = next(merge_iter).float()
                    n = min_ste(n, merge)
                    macs = macs + 8 * n * C * C
        macs = macs + 8 * dims[-1] * num_classes
    return macs / 1e9
