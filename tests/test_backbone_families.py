"""The backbone registry (shared/backbones.py) and the token-reduction methods on every family it supports, by timm's
own model names with small random weights: ToMe (shared.tome), ToCom (tocom.models) and TAVT's patch drop
(tavt.length_drop). DiffRate and A-ViT have their cases in test_backbone_families_diffrate_avit.py."""
import copy

import pytest
import timm
import torch

from shared.backbones import (FAMILIES, REFUSED, UnsupportedBackbone, describe, pool_features, require_supported)
from shared.flops import flop_counter_macs, vit_dims, vit_macs
from shared.tome import apply_patch
from tavt.length_drop import apply_patch_drop, gene_token_counts
from tocom.models import add_compensator, fold_compensator, set_r

METHODS = ['tome', 'tocom', 'tavt']
R = 5            # ToMe / ToCom: tokens merged per block (r_tgt); ToCom compensates from R_SRC
R_SRC = 2
KEEP = 0.75      # TAVT: each block keeps ceil(KEEP * tokens entering it)


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


# ------------------------------------------------------------------------------------------- the methods, per family
def patched(method, model, seed=3):
    """The method applied to a copy of `model`, configured to reduce nothing (r = 0, no gene)."""
    model = copy.deepcopy(model)
    if method == 'tome':
        return apply_patch(model, trace_source=True)
    if method == 'tocom':
        model = add_compensator(apply_patch(model, trace_source=True), tocom_dim=32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # a trained compensator, not the zero-initialised one that changes nothing
            for name, weight in model.named_parameters():
                if 'adapter' in name:
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
        return set_r(model, 0, 0).eval()
    return apply_patch_drop(model)


def reduce(method, model):
    """Set the method to its reduced configuration; returns (attention tokens, MLP tokens) per block, counted here
    independently of the methods' code."""
    prefix, n = model.num_prefix_tokens, model.patch_embed.num_patches + model.num_prefix_tokens
    attn, mlp = [], []
    for _ in model.blocks:
        attn.append(n)
        if method == 'tavt':
            n = -(-n * 3 // 4)  # ceil(KEEP * n)
        else:
            n -= min(R, (n - prefix) // 2)  # ToMe's cap: half of the unprotected tokens
        mlp.append(n)
    if method == 'tome':
        model.r = R
    elif method == 'tocom':
        set_r(model, R, R_SRC)
    else:
        model.set_length_config(mlp)
    return attn, mlp


class TokenCounts:
    """Tokens entering each block's attention (qkv input) and MLP (fc1 input), recorded by hooks."""

    def __init__(self, model):
        self.attn, self.mlp = [], []
        for block in model.blocks:
            block.attn.qkv.register_forward_pre_hook(lambda m, args: self.attn.append(args[0].shape[1]))
            block.mlp.fc1.register_forward_pre_hook(lambda m, args: self.mlp.append(args[0].shape[1]))


def attention_pool_macs(model, tokens):
    """MACs of timm's AttentionPoolLatent ('map') over `tokens` tokens: latent query, keys/values, attention, output
    projection and MLP (shared.flops counts the blocks and the head only)."""
    pool = model.attn_pool
    latents, dim = pool.latent_len, pool.kv.in_features
    return (latents * pool.q.in_features * pool.q.out_features + tokens * pool.kv.in_features * pool.kv.out_features
            + 2 * latents * tokens * dim + latents * pool.proj.in_features * pool.proj.out_features
            + latents * (pool.mlp.fc1.in_features * pool.mlp.fc1.out_features
                         + pool.mlp.fc2.in_features * pool.mlp.fc2.out_features))


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_method_on_family(family, method):
    name, kwargs = FAMILIES[family]
    plain = build(name, kwargs)
    backbone = describe(plain)
    prefix = backbone.num_prefix_tokens
    x = images(kwargs)
    model = patched(method, plain)

    with torch.no_grad():
        # nothing to reduce: exactly the unpatched model (a full-length gene too)
        expected = plain(x)
        assert torch.equal(model(x), expected)
        if method == 'tavt':
            model.set_length_config([plain.patch_embed.num_patches + prefix] * backbone.depth)
            assert torch.equal(model(x), expected)

        # reduced: exact token counts per block
        attn_tokens, mlp_tokens = reduce(method, model)
        counts = TokenCounts(model)
        out = model(x)
        assert out.shape == expected.shape and torch.isfinite(out).all()
        assert counts.attn == attn_tokens and counts.mlp == mlp_tokens
        if method == 'tavt':  # the counts tavt.length_drop reports for FLOPs
            assert gene_token_counts(model, mlp_tokens) == (attn_tokens, mlp_tokens)
        assert mlp_tokens[-1] < attn_tokens[0] - prefix  # the forward did reduce

        # prefix tokens never merged or dropped: still at 0..P-1, each holding only itself
        if method in ('tome', 'tocom'):
            info = model._tome_info
            source, size = info['source'], info['size']
            assert torch.equal(source[:, :prefix, :prefix], torch.eye(prefix).expand(len(x), -1, -1))
            assert torch.all(source[:, :prefix].sum(-1) == 1) and torch.all(size[:, :prefix] == 1)
            assert torch.all(size.sum(1) == attn_tokens[0])
            # size-weighted pooling == the model's own pooling over the merged tokens copied back to every patch
            tokens = model.forward_features(x)
            per_patch = model._tome_info['source'].transpose(1, 2) @ tokens
            torch.testing.assert_close(out, type(plain).forward_head(model, per_patch), rtol=0, atol=2e-5)
        if method != 'tocom':  # (the compensator changes the attention itself when r_src != r_tgt)
            check_prefix_after_first_reduction(plain, model, x, prefix)

        # analytic FLOPs (shared.flops: MACs; the patch embedding counted with the prefix slots) == FlopCounterMode / 2
        dims, _ = vit_dims(model)
        analytic = vit_macs(attn_tokens, mlp_tokens, **dims)
        analytic -= prefix * dims['embed_dim'] * dims['in_chans'] * dims['patch_size'] ** 2
        if method == 'tocom':  # unfolded: q and v adapters, down and up, on every token entering the attention
            analytic += sum(2 * 2 * n * dims['embed_dim'] * 32 for n in attn_tokens)
        if method in ('tome', 'tocom'):  # the convention leaves out the matching: set A x set B cosines on the metric
            head_dim = backbone.embed_dim // backbone.num_heads
            analytic += sum((n + 1) // 2 * (n // 2) * head_dim for n, m in zip(attn_tokens, mlp_tokens) if m < n)
        if backbone.global_pool == 'map':
            analytic += attention_pool_macs(model, mlp_tokens[-1] - prefix)
        if backbone.has_distill_token:  # DeiT's second head, on the distillation token
            analytic += model.head_dist.in_features * model.head_dist.out_features
        # torch's counter trips over a trainable parameter fed straight into a module (the 'map' pool's latent
        # query) unless the weights are frozen
        model.requires_grad_(False)
        assert flop_counter_macs(model, x) == pytest.approx(analytic, rel=1e-12)

        if method == 'tocom':  # the compensation folds into qkv: same logits, no adapter FLOPs
            folded = fold_compensator(model, R, R_SRC).eval()
            torch.testing.assert_close(folded(x), out, rtol=0, atol=1e-6)


def check_prefix_after_first_reduction(plain, model, x, prefix):
    """The first block's attention output is the same with and without the reduction, which comes after it: so the
    prefix rows entering its MLP (the norm2 input) must equal the plain model's, position by position."""
    seen = {}
    for key, m in (('plain', plain), ('reduced', model)):
        handle = m.blocks[0].norm2.register_forward_pre_hook(lambda mod, args, key=key: seen.setdefault(key, args[0]))
        m(x)
        handle.remove()
    assert seen['reduced'].shape[1] < seen['plain'].shape[1]
    torch.testing.assert_close(seen['reduced'][:, :prefix], seen['plain'][:, :prefix], rtol=0, atol=1e-6)


@pytest.mark.parametrize('family', sorted(REFUSED))
def test_refused_families_name_the_reason(family):
    name, kwargs, reason = REFUSED[family]
    model = build(name, kwargs)
    with pytest.raises(UnsupportedBackbone, match=reason):
        describe(model)
    for method, apply in (('ToMe', apply_patch), ('ToCom', add_compensator), ('TAVT', apply_patch_drop)):
        with pytest.raises(UnsupportedBackbone) as excinfo:
            apply(copy.deepcopy(model))
        assert str(excinfo.value).startswith(f'{method} cannot be applied to {name}: {reason}')


def test_patch_drop_equals_tavt_model():
    """On a plain class-token ViT, the timm patch drop keeps the same tokens as TAVT's own (ViT-pytorch) model with the
    same weights and gene; the logits agree up to the order of floating-point sums."""
    from tavt.compare import config_of
    from tavt.models.modeling import VisionTransformer as TavtViT
    from tavt.models.npz import timm_to_vit_pytorch
    name, kwargs = FAMILIES['deit']
    plain = build(name, kwargs)
    tavt = TavtViT(config_of(plain), kwargs['img_size'], kwargs['num_classes']).eval()
    tavt.load_state_dict(timm_to_vit_pytorch(plain.state_dict(), len(plain.blocks)))
    gene = (49, 37, 28, 21)
    dropped = apply_patch_drop(copy.deepcopy(plain), gene)
    x = images(kwargs)
    with torch.no_grad():
        torch.testing.assert_close(dropped(x), tavt(x, length_config=gene), rtol=0, atol=1e-5)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_tome_gflops_count_the_merged_tokens(family):
    """tocom.measure.model_gflops (compare's GFLOPs of ToMe/ToCom) follows the token counts the patched forward used,
    at an r large enough that the cap on mergeable tokens (which excludes every prefix token) binds."""
    from tocom.measure import model_gflops
    name, kwargs = FAMILIES[family]
    model = apply_patch(build(name, kwargs)).eval()
    model.r = 40
    counts = []
    hooks = [blk.register_forward_pre_hook(lambda m, inp: counts.append(inp[0].shape[1])) for blk in model.blocks]
    with torch.no_grad():
        model(images(kwargs, batch=1))
    for h in hooks:
        h.remove()
    dims, _ = vit_dims(model)
    after = counts[1:] + [counts[-1] - min(40, (counts[-1] - dims['num_prefix_tokens']) // 2)]
    assert model_gflops(model, 40) == pytest.approx(vit_macs(counts, after, **dims) / 1e9, rel=1e-12)


def test_tavt_compare_refuses_what_its_own_model_cannot_express():
    """TAVT's distillation and search (tavt/compare.py) need its ViT-pytorch model: other families stop with one
    user error naming what is missing (it used to be a ValueError traceback)."""
    from tavt.compare import config_of
    name, kwargs = FAMILIES['dinov2_reg']
    with pytest.raises(UnsupportedBackbone, match='TAVT cannot be applied.*a single class token.*no layer scale'):
        config_of(build(name, kwargs))
