"""The backbone registry (shared/backbones.py) on timm's own model names with small random weights."""
import pytest
import timm
import torch

from shared.backbones import (FAMILIES, REFUSED, UnsupportedBackbone, describe, pool_features, require_supported)


def build(name, kwargs, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def images(kwargs, batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, kwargs['img_size'], kwargs['img_size'], generator=generator)


# what each family is, written out by hand from timm's model definitions (independent of describe's code)
EXPECTED = {
    'deit': dict(num_prefix_tokens=1, has_class_token=True, num_registers=0, global_pool='token', layer_scale=False,
                 pre_norm=False, fc_norm=False),
    'deit_distilled': dict(num_prefix_tokens=2, has_class_token=True, num_registers=0, global_pool='token',
                           layer_scale=False, pre_norm=False, fc_norm=False),
    'clip': dict(num_prefix_tokens=1, has_class_token=True, num_registers=0, global_pool='token', layer_scale=False,
                 pre_norm=True, fc_norm=False),
    'dinov2_reg': dict(num_prefix_tokens=5, has_class_token=True, num_registers=4, global_pool='token',
                       layer_scale=True, pre_norm=False, fc_norm=False),
    'siglip': dict(num_prefix_tokens=0, has_class_token=False, num_registers=0, global_pool='map', layer_scale=False,
                   pre_norm=False, fc_norm=False),
    'vit_gap': dict(num_prefix_tokens=0, has_class_token=False, num_registers=0, global_pool='avg', layer_scale=True,
                    pre_norm=False, fc_norm=False),
    'vit_reg_gap': dict(num_prefix_tokens=4, has_class_token=False, num_registers=4, global_pool='avg',
                        layer_scale=True, pre_norm=False, fc_norm=True),
}


def test_every_family_has_expectations():
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_describe(family):
    name, kwargs = FAMILIES[family]
    backbone = describe(build(name, kwargs))
    assert backbone.family == family
    for field, value in EXPECTED[family].items():
        assert getattr(backbone, field) == value, field
    assert (backbone.embed_dim, backbone.depth, backbone.num_heads) == (64, 4, 4)
    assert backbone.has_distill_token == (family == 'deit_distilled')


@pytest.mark.parametrize('family', sorted(REFUSED))
@pytest.mark.parametrize('method', ['ToMe', 'ToCom', 'TAVT'])
def test_refused_families_name_the_reason(family, method):
    name, kwargs, reason = REFUSED[family]
    model = build(name, kwargs)
    with pytest.raises(UnsupportedBackbone, match=reason):
        describe(model)
    with pytest.raises(UnsupportedBackbone) as excinfo:
        require_supported(model, method, merges=method != 'TAVT')
    assert str(excinfo.value).startswith(f'{method} cannot be applied to {name}: {reason}')


def test_models_without_blocks_are_refused():
    with pytest.raises(UnsupportedBackbone, match=r'has no `\.blocks`'):
        describe(torch.nn.Linear(2, 2))


def test_pool_limits_per_method():
    name, kwargs = FAMILIES['vit_gap']
    model = build(name, kwargs)
    model.global_pool = 'max'
    with pytest.raises(UnsupportedBackbone, match="ToMe cannot .*global_pool='max' has no size-weighted form"):
        require_supported(model, 'ToMe')
    assert require_supported(model, 'TAVT', merges=False).global_pool == 'max'
    model.global_pool = ''
    with pytest.raises(UnsupportedBackbone, match="global_pool='' returns every token"):
        require_supported(model, 'TAVT', merges=False)
    with pytest.raises(UnsupportedBackbone, match='reads the class token'):
        require_supported(build(*FAMILIES['siglip']), 'A-ViT', merges=False, needs_class_token=True)


@pytest.mark.parametrize('family', ['siglip', 'vit_gap', 'vit_reg_gap', 'dinov2_reg'])
def test_pool_features(family):
    """Without sizes: the model's own head input, exactly. With sizes: a token of size s weighs as s copies of it."""
    name, kwargs = FAMILIES[family]
    model = build(name, kwargs)
    with torch.no_grad():
        tokens = model.forward_features(images(kwargs))
        assert torch.equal(pool_features(model, tokens), model.forward_head(tokens, pre_logits=True))
        # the sequence with its last patch token written twice == the sequence once, that token of size 2
        doubled = torch.cat([tokens, tokens[:, -1:]], dim=1)
        size = torch.ones_like(tokens[..., :1])
        size[:, -1] = 2
        expected = pool_features(model, doubled)
        torch.testing.assert_close(pool_features(model, tokens, size), expected, rtol=0, atol=1e-5)
        if family == 'dinov2_reg':  # class-token pooling ignores sizes
            assert torch.equal(pool_features(model, tokens, size), pool_features(model, tokens))
