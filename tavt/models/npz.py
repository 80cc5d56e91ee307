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


def resize_position_embedding(posemb, num_tokens):
    """The original's resize: keep the class row, resample the square grid bilinearly with aligned corners."""
    import torch.nn.functional as F
    tok, grid = posemb[:, :1], posemb[0, 1:]
    gs_old = int(round(grid.shape[0] ** 0.5))
    gs_new = int(round((num_tokens - 1) ** 0.5))
    if gs_old * gs_old != grid.shape[0] or gs_new * gs_new != num_tokens - 1:
        raise NpzMismatchError(f"position embedding of {posemb.shape[1]} tokens cannot be resized to {num_tokens}: "
                               f"both grids must be square (overlap splits need a square image)")
    _logger.info("load_pretrained: grid-size from %s to %s", gs_old, gs_new)
    grid = grid.reshape(1, gs_old, gs_old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(gs_new, gs_new), mode='bilinear', align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, gs_new * gs_new, -1)
    return torch.cat([tok.float(), grid], dim=1)


def _read_npz(weights):
    import numpy as np
    if isinstance(weights, (str, bytes)) or hasattr(weights, '__fspath__'):
        import os
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"--pretrained_dir {weights}: no such .npz file (Google's ViT weights, e.g. "
                                    f"https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz)")
        weights = np.load(weights)
    return {k: weights[k] for k in weights.keys()} if not isinstance(weights, dict) else weights


def _npz_to_timm(arrays):
    """The project's converter when it is there; until then timm's own npz loader on a model of the npz's shape."""
    try:
        from shared.checkpoint import npz_to_timm_state_dict
    except ImportError:
        npz_to_timm_state_dict = None
    if npz_to_timm_state_dict is not None:
        return npz_to_timm_state_dict(arrays)
    import os
    import tempfile

    import numpy as np
    from timm.models.vision_transformer import VisionTransformer as TimmViT, _load_weights
    kernel = arrays['embedding/kernel']
    q = arrays['Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel']
    depth = len({k.split('/')[1] for k in arrays if k.startswith('Transformer/encoderblock_')})
    grid = int(round((arrays['Transformer/posembed_input/pos_embedding'].shape[1] - 1) ** 0.5))
    mlp = arrays['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'].shape[1]
    classes = arrays['head/kernel'].shape[1] if 'head/kernel' in arrays else 0
    net = TimmViT(img_size=grid * kernel.shape[0], patch_size=kernel.shape[0], embed_dim=kernel.shape[3],
                  depth=depth, num_heads=q.shape[1], mlp_ratio=mlp / kernel.shape[3], num_classes=classes,
                  qkv_bias=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'w.npz')
        np.savez(path, **arrays)
        _load_weights(net, path)
    return net.state_dict()


def load_npz_weights(model, weights):
    """Load Google's npz (a path, an NpzFile or a dict of arrays) into a tavt VisionTransformer, ViT-pytorch style:
    head zeroed when `model.zero_head` (the npz head is ignored), position embedding resized when the grids differ.
    Raises NpzMismatchError naming every key whose shape differs or that is missing."""
    arrays = _read_npz(weights)
    num_layers = model.num_layers
    try:
        timm_sd = _npz_to_timm(arrays)
        state = timm_to_vit_pytorch(timm_sd, num_layers)
    except KeyError as e:
        raise NpzMismatchError(f"the npz lacks {e} needed by this {num_layers}-layer model") from None
    if model.zero_head or 'head.weight' not in state:
        state['head.weight'] = torch.zeros_like(model.head.weight)
        state['head.bias'] = torch.zeros_like(model.head.bias)
    posemb = state['transformer.embeddings.position_embeddings']
    if posemb.shape[1] != model.num_tokens and posemb.shape[-1] == model.config.hidden_size:
        state['transformer.embeddings.position_embeddings'] = resize_position_embedding(posemb, model.num_tokens)
    own = model.state_dict()
    problems = [f"{k}: npz {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    problems += [f"{k}: missing from the npz" for k in own if k not in state]
    extra_blocks = sorted({k.split('.')[1] for k in timm_sd if k.startswith('blocks.')}, key=int)
    if len(extra_blocks) != num_layers:
        problems.append(f"the npz has {len(extra_blocks)} encoder blocks, the model {num_layers}")
    if problems:
        raise NpzMismatchError("the npz does not match the model (--model_type / --img_size):\n  "
                               + "\n  ".join(problems))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(torch.as_tensor(v).to(own[k].dtype))
    return model
