"""ToE models: LV-ViT's initialisation and MixToken, the DeiT expansion model's gradient-checkpointing path."""
import numpy as np
import torch
from timm.layers import trunc_normal_
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from toe.deit.models import create_model as create_deit
from toe.lvvit.models import LVViTExpansion, rand_bbox
from toe.lvvit.models import create_model as create_lvvit
from toe.token_select import TokenSelect


def deit_style_init(model):
    """The initialisation spelled out: truncated normal (std 0.02) position embedding, class token, then every linear
    layer in module order with zero biases; LayerNorms to identity; nothing else touched."""
    trunc_normal_(model.pos_embed, std=.02)
    trunc_normal_(model.cls_token, std=.02)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def test_lvvit_init_equals_the_spelled_out_init(monkeypatch):
    name = 'lvvit_t'  # the dense-head model: every linear layer kind
    torch.manual_seed(7)
    model = create_lvvit(name, img_size=32, num_classes=5)
    monkeypatch.setattr(LVViTExpansion, 'initialize_weights', deit_style_init)
    torch.manual_seed(7)
    expected = create_lvvit(name, img_size=32, num_classes=5)
    state, expected_state = model.state_dict(), expected.state_dict()
    assert list(state) == list(expected_state)
    for key in state:
        assert torch.equal(state[key], expected_state[key]), key
    assert model.no_weight_decay() == {'cls_token', 'pos_embed'}


def test_mix_tokens_box_and_unmix_restores_each_image():
    model = create_lvvit('lvvit_t', img_size=32, num_classes=5)
    grid = torch.randn(4, 3, 6, 6)
    np.random.seed(3)
    mixed, box = model.mix_tokens(grid)
    np.random.seed(3)
    assert box == rand_bbox(grid.size(), np.random.beta(model.beta, model.beta))
    x1, y1, x2, y2 = box
    inside = torch.zeros(6, 6, dtype=torch.bool)
    inside[x1:x2, y1:y2] = True
    assert inside.any() and not inside.all()
    assert torch.equal(mixed[..., inside], grid.flip(0)[..., inside])
    assert torch.equal(mixed[..., ~inside], grid[..., ~inside])
    # predictions made on the mixed grid, unmixed: every image gets back its own tokens
    dense = mixed.flatten(2).transpose(1, 2)
    assert torch.equal(model.unmix_dense(dense, box, (6, 6)), grid.flatten(2).transpose(1, 2))


def test_deit_grad_checkpointing_runs_every_token_like_timm():
    torch.manual_seed(0)
    model = create_deit('vit_digits_patch4_32', num_classes=4).eval()
    model.token_select = TokenSelect([0, 1], [0.5, 1.0], 0.25, 2)
    model.token_select.update_current_stage(0)
    model.token_select.sparse_inference = True  # select in eval mode too
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape[1] == 1 + 32  # the selection keeps half of the 64 patches
        model.set_grad_checkpointing(True)
        assert torch.equal(model.forward_features(x), VisionTransformer.forward_features(model, x))
