"""Google `.npz` ViT weights -> TAVT's ViT-pytorch module names.

The npz is read into timm's names by the project's converter (shared.checkpoint.npz_to_timm_state_dict); this file
renames those to ViT-pytorch's and resizes the position embedding as the original did: scipy `ndimage.zoom(order=1)`
on the patch grid, which is bilinear interpolation with align_corners=True (timm's default is bicubic without
corner alignment, up to ~2 apart per element, hence the explicit mode here).
"""
import logging

import torch

_logger = logging.getLogger(__name__)


class NpzMismatchError(ValueError):
    """The npz does not hold the architecture the model was built as."""


def timm_to_vit_pytorch(state_dict, num_layers):
    """Rename (and split qkv of) a timm VisionTransformer state dict to ViT-pytorch's names."""
    out = {
        'transformer.embeddings.patch_embeddings.weight': state_dict['patch_embed.proj.weight'],
        'transformer.embeddings.patch_embeddings.bias': state_dict['patch_embed.proj.bias'],
        'transformer.embeddings.cls_token': state_dict['cls_token'],
        'transformer.embeddings.position_embeddings': state_dict['pos_embed'],
        'transformer.encoder.encoder_norm.weight': state_dict['norm.weight'],
        'transformer.encoder.encoder_norm.bias': state_dict['norm.bias'],
    }
    for i in range(num_layers):
        src, dst = f'blocks.{i}.', f'transformer.encoder.layer.{i}.'
        for name in ('weight', 'bias'):
            q, k, v = state_dict[src + f'attn.qkv.{name}'].chunk(3, dim=0)
            out[dst + f'attn.query.{name}'], out[dst + f'attn.key.{name}'], out[dst + f'attn.value.{name}'] = q, k, v
            out[dst + f'attn.out.{name}'] = state_dict[src + f'attn.proj.{name}']
            out[dst + f'attention_norm.{name}'] = state_dict[src + f'norm1.{name}']
            out[dst + f'ffn_norm.{name}'] = state_dict[src + f'norm2.{name}']
            out[dst + f'ffn.fc1.{name}'] = state_dict[src + f'mlp.fc1.{name}']
            out[dst + f'ffn.fc2.{name}'] = state_dict[src + f'mlp.fc2.{name}']
    for name in ('weight', 'bias'):
        if f'head.{name}' in state_dict:
            out[f'head.{name}'] = state_dict[f'head.{name}']
    return out


def _read_npz(weights):
    import numpy as np
    if isinstance(weights, (str, bytes)) or hasattr(weights, '__fspath__'):
        import os
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"--pretrained_dir {weights}: no such .npz file (Google's ViT weights, e.g. "
                                    f"https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz)")
        weights = np.load(weights)
    return {k: weights[k] for k in weights.keys()} if not isinstance(weights, dict) else weights


def _npz_to_timm(arrays, model):
    """The project's converter, given the attributes it reads of a timm model (blocks, head); no position-embedding
    target, so that the resize below is the one that happens."""
    from types import SimpleNamespace

    from shared.checkpoint import npz_to_timm_state_dict
    shim = SimpleNamespace(blocks=[None] * model.num_layers, head=model.head)
    return npz_to_timm_state_dict(arrays, shim)


def load_npz_weights(model, weights):
    """Load Google's npz (a path, an NpzFile or a dict of arrays) into a tavt VisionTransformer, ViT-pytorch style:
    head zeroed when `model.zero_head` (the npz head is ignored), position embedding resized when the grids differ.
    Raises NpzMismatchError naming every key whose shape differs or that is missing."""
    arrays = _read_npz(weights)
    num_layers = model.num_layers
    from shared.checkpoint import CheckpointError, resize_pos_embed
    npz_blocks = {k.split('/')[1] for k in arrays if k.startswith('Transformer/encoderblock_')}
    if len(npz_blocks) != num_layers:
        raise NpzMismatchError(f"the npz has {len(npz_blocks)} encoder blocks (Transformer/encoderblock_*), the "
                               f"model {num_layers} (--model_type)")
    try:
        state = timm_to_vit_pytorch(_npz_to_timm(arrays, model), num_layers)
    except (KeyError, CheckpointError) as e:
        raise NpzMismatchError(f"the npz does not match this {num_layers}-layer model: {e}") from None
    if model.zero_head or 'head.weight' not in state:
        state['head.weight'] = torch.zeros_like(model.head.weight)
        state['head.bias'] = torch.zeros_like(model.head.bias)
    posemb = state['transformer.embeddings.position_embeddings']
    if posemb.shape[1] != model.num_tokens and posemb.shape[-1] == model.config.hidden_size:
        new_grid = int(round((model.num_tokens - 1) ** 0.5))
        _logger.info("load_pretrained: resized variant: %s to %d tokens", tuple(posemb.shape), model.num_tokens)
        try:
            state['transformer.embeddings.position_embeddings'] = resize_pos_embed(
                posemb, new_grid, 1, mode='bilinear', align_corners=True)
        except CheckpointError as e:
            raise NpzMismatchError(f"position embedding: {e}") from None
    own = model.state_dict()
    problems = [f"{k}: npz {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    problems += [f"{k}: missing from the npz" for k in own if k not in state]
    if problems:
        raise NpzMismatchError("the npz does not match the model (--model_type / --img_size):\n  "
                               + "\n  ".join(problems))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(torch.as_tensor(v).to(own[k].dtype))
    return model
