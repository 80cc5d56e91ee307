"""ViT-pytorch's VisionTransformer with TAVT's patch drop (LAT's LengthDrop) and LayerDrop.

Module and parameter names are ViT-pytorch's (`transformer.encoder.layer.{i}.attn.query.weight`, ...), so that
checkpoints written by the original load here and the other way round.

Patch drop: inside each block, after the attention residual and before the FFN, a layer with a length L keeps the
class token plus the L-1 patch tokens that *received* the most attention (post-softmax probabilities summed over
heads and queries). A "gene" (length configuration) gives L per layer; a "layer configuration" is the tuple of layers
to run (LayerDrop skips the others).
"""
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from shared.flops import vit_macs
from tavt.models.configs import get_config

_logger = logging.getLogger(__name__)


class GeneError(ValueError):
    """A length configuration the model cannot run (wrong length, increasing, or above the token count)."""


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config.transformer.num_heads
        self.attention_head_size = config.hidden_size // self.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        # ViT-pytorch applies the *attention* dropout rate (0.0) after `out` too, not the MLP's 0.1.
        self.attn_dropout = nn.Dropout(config.transformer.attention_dropout_rate)
        self.proj_dropout = nn.Dropout(config.transformer.attention_dropout_rate)

    def _heads(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.num_attention_heads, self.attention_head_size).permute(0, 2, 1, 3)

    def forward(self, hidden_states):
        """Returns the output and the post-softmax probabilities (B, heads, queries, keys) before dropout, which the
        patch drop ranks tokens by; the explicit (non-fused) path is kept so they exist."""
        q = self._heads(self.query(hidden_states))
        k = self._heads(self.key(hidden_states))
        v = self._heads(self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        probs = scores.softmax(dim=-1)
        context = torch.matmul(self.attn_dropout(probs), v)
        context = context.permute(0, 2, 1, 3).flatten(2)
        return self.proj_dropout(self.out(context)), probs


class Mlp(nn.Module):
    def __init__(self, config):
        super().__init__()
        width, hidden = config.hidden_size, config.transformer.mlp_dim
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.dropout = nn.Dropout(config.transformer.dropout_rate)
        # Xavier weights and near-zero biases; both weights are drawn before both biases, which fixes the RNG order.
        layers = (self.fc1, self.fc2)
        for fc in layers:
            nn.init.xavier_uniform_(fc.weight)
        for fc in layers:
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x):
        x = self.dropout(F.gelu(self.fc1(x)))
        return self.dropout(self.fc2(x))


def num_patches(config, img_size):
    """Patch-token count for TransFG's two splits ('non-overlap': stride = patch; 'overlap': stride = slide_step)."""
    h, w = _pair(img_size)
    ph, pw = _pair(config.patches.size)
    if config.split == 'non-overlap':
        return (h // ph) * (w // pw)
    if config.split == 'overlap':
        return ((h - ph) // config.slide_step + 1) * ((w - pw) // config.slide_step + 1)
    raise ValueError(f"unknown --split {config.split!r}: expected 'non-overlap' or 'overlap'")


class Embeddings(nn.Module):
    def __init__(self, config, img_size, in_channels=3):
        super().__init__()
        patch = _pair(config.patches.size)
        stride = patch if config.split == 'non-overlap' else _pair(config.slide_step)
        n_patches = num_patches(config, img_size)
        self.patch_embeddings = nn.Conv2d(in_channels, config.hidden_size, kernel_size=patch, stride=stride)
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches + 1, config.hidden_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.dropout = nn.Dropout(config.transformer.dropout_rate)

    def forward(self, x):
        x = self.patch_embeddings(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.dropout(x + self.position_embeddings)


def attention_received(probs):
    """Per key token, the attention it receives from every query of every head: (B, H, Nq, Nk) -> (B, Nk)."""
    return probs.sum(2).sum(1)


def select_tokens(x, probs, output_length):
    """Keep the class token and the `output_length - 1` patch tokens that received the most attention.

    Returns the kept rows (class token first, then by descending score, as `topk` orders them) and their indices
    into `x`."""
    score = attention_received(probs)
    keep = score[:, 1:].topk(output_length - 1, dim=1).indices + 1
    keep = torch.cat((keep.new_zeros(keep.shape[0], 1), keep), dim=1)
    return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])), keep


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.ffn = Mlp(config)
        self.attn = Attention(config)

    def forward(self, x, output_length=None):
        attn_out, probs = self.attn(self.attention_norm(x))
        x = x + attn_out
        keep = None
        if output_length is not None:
            # The patch drop sits between the attention residual and the FFN: the FFN runs on kept tokens only.
            x, keep = select_tokens(x, probs, output_length)
        x = x + self.ffn(self.ffn_norm(x))
        return x, keep


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([Block(config) for _ in range(config.transformer.num_layers)])
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        # LAT's drop-and-restore: dropped tokens are written back (with their last state) before the final norm.
        # Only the class token reaches the head, so turning it off changes no logit; it saves memory and time.
        self.restore_dropped = True

    def forward(self, hidden_states, layer_config=None, length_config=None):
        restore = length_config is not None and self.restore_dropped
        if restore:
            b, n, d = hidden_states.shape
            restored = hidden_states
            positions = torch.arange(n, device=hidden_states.device).unsqueeze(0).expand(b, -1)
        for i, block in enumerate(self.layer):
            if layer_config is not None and i not in layer_config:
                continue  # LayerDrop: a skipped layer's gene entry is ignored
            length = length_config[i] if length_config is not None else None
            hidden_states, keep = block(hidden_states, output_length=length)
            if restore and keep is not None:
                positions = positions.gather(1, keep)
                restored = restored.scatter(1, positions.unsqueeze(-1).expand(-1, -1, d), hidden_states)
        return self.encoder_norm(restored if restore else hidden_states)


class Transformer(nn.Module):
    def __init__(self, config, img_size):
        super().__init__()
        self.embeddings = Embeddings(config, img_size=img_size)
        self.encoder = Encoder(config)

    def forward(self, x, layer_config=None, length_config=None):
        return self.encoder(self.embeddings(x), layer_config, length_config)


class VisionTransformer(nn.Module):
    """ViT-pytorch's model with TAVT's `forward(x, labels=None, layer_config=None, length_config=None)`:
    returns `(cross-entropy, logits)` with labels, the logits otherwise. Without an explicit `length_config`, the gene
    installed by `set_length_config` (None: no drop) is used."""

    def __init__(self, config, img_size=224, num_classes=21843, zero_head=False, vis=False):
        super().__init__()
        self.config = config
        self.img_size = img_size
        self.num_classes = num_classes
        self.zero_head = zero_head
        self.classifier = config.classifier
        self.transformer = Transformer(config, img_size)
        self.head = nn.Linear(config.hidden_size, num_classes)
        self.length_config = None

    @property
    def num_layers(self):
        return len(self.transformer.encoder.layer)

    @property
    def num_tokens(self):
        return self.transformer.embeddings.position_embeddings.shape[1]

    def check_length_config(self, length_config):
        """Raise GeneError unless the gene has one non-increasing count per layer within [1, token count]."""
        if length_config is None:
            return None
        gene = tuple(int(v) for v in length_config)
        if len(gene) != self.num_layers:
            raise GeneError(f"length configuration {gene} has {len(gene)} entries; the model has "
                            f"{self.num_layers} layers")
        previous = self.num_tokens
        for i, length in enumerate(gene):
            if length > previous:
                what = (f"exceeds the model's {self.num_tokens} tokens (class token included)" if i == 0 else
                        f"increases from {previous} at layer {i - 1}; tokens once dropped cannot come back")
                raise GeneError(f"length configuration {gene}: layer {i} keeps {length} tokens, which {what}")
            if length < 1:
                raise GeneError(f"length configuration {gene}: layer {i} keeps {length} tokens; at least the "
                                f"class token (1) must remain")
            previous = length
        return gene

    def set_length_config(self, length_config):
        self.length_config = self.check_length_config(length_config)

    def forward(self, x, labels=None, layer_config=None, length_config=None):
        if length_config is not None:
            length_config = self.check_length_config(length_config)
        else:
            length_config = self.length_config
        encoded = self.transformer(x, layer_config, length_config)
        logits = self.head(encoded[:, 0])
        if labels is not None:
            return F.cross_entropy(logits.view(-1, self.num_classes), labels.view(-1)), logits
        return logits

    def load_from(self, weights):
        """Load Google's `.npz` (a dict of arrays) through the project's converter, with the original's
        position-embedding resize (see tavt.models.npz)."""
        from tavt.models.npz import load_npz_weights
        load_npz_weights(self, weights)


def build_model(model_type, img_size, num_classes, zero_head=True, split='non-overlap', slide_step=12):
    """The original's `setup()` model: config from `--model_type`, split fields from the command line."""
    config = get_config(model_type)
    config.split = split
    config.slide_step = slide_step
    return VisionTransformer(config, img_size, zero_head=zero_head, num_classes=num_classes)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6


def gene_macs(model, length_config=None):
    """MACs of one image under a gene, in the project's convention (shared.flops): block i's attention runs on the
    tokens that left block i-1 (all of them for block 0), its FFN on the gene's count. None: the full model."""
    model.check_length_config(length_config)
    n = model.num_tokens
    gene = tuple(length_config) if length_config is not None else (n,) * model.num_layers
    attn_tokens = (n,) + gene[:-1]
    cfg = model.config
    conv = model.transformer.embeddings.patch_embeddings
    return vit_macs(attn_tokens, gene, embed_dim=cfg.hidden_size, patch_size=conv.kernel_size[0],
                    num_patches=n - 1, num_classes=model.num_classes, in_chans=conv.in_channels,
                    mlp_ratio=cfg.transformer.mlp_dim / cfg.hidden_size)
