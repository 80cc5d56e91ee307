"""LV-ViT (TokenLabeling) with ToE: token expansion before block 1 and, after the final norm, the reduced sequence
scattered back into an all-zero (B, 1+N, C) tensor, so the dense head, MixToken and the token-labelling loss keep
working on the full grid (dropped positions are zero vectors, as in ToE/lvvit/tlt/models/lvvit_expansion.py).

Names: lvvit (the 16-block LV-ViT-S without dense head), lvvit_t, lvvit_s, lvvit_m (dense head + MixToken).
"""
from functools import partial

import numpy as np
import torch
from torch import nn
from timm.layers import DropPath, trunc_normal_
from timm.models import named_apply
from timm.models.vision_transformer import init_weights_vit_timm

from toe.token_select import TokenSelect


class Attention(nn.Module):
    """Multi-head self-attention without qkv bias (LV-ViT's default), explicit softmax."""

    def __init__(self, dim, num_heads=8, head_dim=None, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, self.head_dim * num_heads * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(self.head_dim * num_heads, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.head_dim * self.num_heads)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.):
        super().__init__()
        self.fc1, self.act, self.fc2, self.drop = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm block whose residual branches are divided by `skip_lam`."""

    def __init__(self, dim, num_heads, head_dim=None, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0.,
                 attn_drop=0., drop_path=0., norm_layer=nn.LayerNorm, skip_lam=1.):
        super().__init__()
        self.skip_lam = skip_lam
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, head_dim, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam


class PatchEmbed4_2(nn.Module):
    """Three-conv stem (7x7/2, 3x3, 3x3; 64 channels, BN, ReLU) then a patch_size/2 projection."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, stem_dim=64):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.conv1 = nn.Conv2d(in_chans, stem_dim, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_dim)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(stem_dim, stem_dim, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_dim)
        self.conv3 = nn.Conv2d(stem_dim, stem_dim, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem_dim)
        self.proj = nn.Conv2d(stem_dim, embed_dim, patch_size // 2, patch_size // 2)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x)


def rand_bbox(size, lam):
    """MixToken box on the (B, C, H, W) token grid (`np.int` of the original replaced by int)."""
    W, H = size[2], size[3]
    cut_rat = np.sqrt(1. - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    cx, cy = np.random.randint(W), np.random.randint(H)
    return (int(np.clip(cx - cut_w // 2, 0, W)), int(np.clip(cy - cut_h // 2, 0, H)),
            int(np.clip(cx + cut_w // 2, 0, W)), int(np.clip(cy + cut_h // 2, 0, H)))


def _init_linear_and_layernorm(module, name=''):
    # timm's ViT initialisation of linear layers; of the other modules only LayerNorms are reset (their default,
    # consuming no random numbers), so the stem's convolutions keep the weights they were built with
    init_weights_vit_timm(module, name, needs_reset=isinstance(module, nn.LayerNorm))


class LVViTExpansion(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop_rate=0., attn_drop_rate=0.,
                 drop_path_rate=0., norm_layer=nn.LayerNorm, head_dim=None, skip_lam=1., mix_token=False,
                 return_dense=False):
        super().__init__()
        self.token_select = TokenSelect()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed4_2(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # one position per token: the class token, then the patch grid
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, head_dim, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i],
                  norm_layer, skip_lam) for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.return_dense, self.mix_token = return_dense, mix_token
        if return_dense:
            self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if mix_token:
            assert return_dense, 'MixToken needs the dense head'
            self.beta = 1.0
        self.initialize_weights()

    def initialize_weights(self):
        """LV-ViT's (DeiT's) initialisation: truncated normal, std 0.02, for the position embedding, the class token and
        every linear weight (zero biases), LayerNorms reset to identity; the stem's convolutions and BatchNorms keep
        PyTorch's defaults. Linear layers are drawn in module order, so a seed gives the original's weights."""
        for embedding in (self.pos_embed, self.cls_token):
            trunc_normal_(embedding, std=.02)
        named_apply(_init_linear_and_layernorm, self)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'cls_token', 'pos_embed'}

    def get_classifier(self):
        return self.head

    def forward_tokens(self, x):
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        full = torch.zeros_like(x)
        index = None
        for i, block in enumerate(self.blocks):
            if i == 1:
                x, index = self.token_select.token_select(x)
            x = block(x)
        x = self.norm(x)
        if index is not None:
            # kept tokens back at their positions, zero vectors where tokens were merged away
            x = full.scatter(1, index, x)
        return x

    def forward_features(self, x):
        return self.forward_tokens(self.patch_embed(x).flatten(2).transpose(1, 2))

    def mix_tokens(self, grid):
        """MixToken on the (B, C, H, W) token grid: a box drawn with a Beta(beta, beta) area is replaced by the same box
        of the batch-flipped grid. Returns the mixed grid and the box (x1, y1, x2, y2)."""
        box = rand_bbox(grid.size(), np.random.beta(self.beta, self.beta))
        x1, y1, x2, y2 = box
        mixed = grid.clone()
        mixed[:, :, x1:x2, y1:y2] = grid.flip(0)[:, :, x1:x2, y1:y2]
        return mixed, box

    @staticmethod
    def unmix_dense(dense, box, grid_size):
        """Undo MixToken on the dense predictions (B, H*W, classes): inside the box, each image gets back the
        predictions of the tokens that came from it (those of the batch-flipped partner)."""
        x1, y1, x2, y2 = box
        grid = dense.reshape(dense.shape[0], *grid_size, dense.shape[-1])
        restored = grid.clone()
        restored[:, x1:x2, y1:y2, :] = grid.flip(0)[:, x1:x2, y1:y2, :]
        return restored.reshape(dense.shape)

    def forward(self, x):
        x = self.patch_embed(x)
        grid_size = x.shape[2:]
        box = (0, 0, 0, 0)
        if self.mix_token and self.training:
            x, box = self.mix_tokens(x)
        x = self.forward_tokens(x.flatten(2).transpose(1, 2))
        x_cls = self.head(x[:, 0])
        if not self.return_dense:
            return x_cls
        x_aux = self.aux_head(x[:, 1:])
        if not self.training:
            return x_cls + 0.5 * x_aux.max(1)[0]
        if self.mix_token:
            x_aux = self.unmix_dense(x_aux, box, grid_size)
        return x_cls, x_aux, box


ARCHS = {
    'lvvit': dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3., skip_lam=2.),
    'lvvit_t': dict(embed_dim=240, depth=12, num_heads=4, mlp_ratio=3., skip_lam=1., return_dense=True,
                    mix_token=True),
    'lvvit_s': dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3., skip_lam=2., return_dense=True,
                    mix_token=True),
    'lvvit_m': dict(embed_dim=512, depth=20, num_heads=8, mlp_ratio=3., skip_lam=2., return_dense=True,
                    mix_token=True),
}
_DROP = ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'checkpoint_path', 'drop_block_rate',
         'bn_momentum', 'bn_eps', 'global_pool', 'drop_connect_rate')


def _build(name, **kwargs):
    if kwargs.get('pretrained'):
        raise ValueError(f'{name}: no pretrained weights are downloaded; use --initial-checkpoint or --finetune')
    kwargs = {k: v for k, v in kwargs.items() if k not in _DROP and v is not None}
    return LVViTExpansion(**{**dict(patch_size=16), **ARCHS[name], **kwargs})


MODELS = {name: partial(_build, name) for name in ARCHS}


def create_model(name, **kwargs):
    from shared.models import create_model as _create
    return _create(name, MODELS, **kwargs)
