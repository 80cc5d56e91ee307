"""DiffRate (schedule and search) and A-ViT (masked and zipped) on every family of shared.backbones: nothing removed
gives the unpatched model bit for bit, a reduced forward has the expected token counts and prefix tokens, the
analytic FLOPs equal torch's FlopCounterMode / 2, and the backbones they cannot honour are refused with the reason."""
import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import avit.models_act as act
from avit.engine_act import per_image_macs
from avit.models_act import adaptive_from_timm
from diffrate.vit import apply_patch
from shared.backbones import FAMILIES, REFUSED, UnsupportedBackbone, describe
from shared.flops import flop_counter_macs, vit_dims, vit_macs


def build(family, **overrides):
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**kwargs, **overrides}).eval()


def images(family, batch=2):
    side = FAMILIES[family][1]['img_size']
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


def counted_macs(model, x):
    """FlopCounterMode / 2 per image with attention as explicit matmuls (the CPU's fused kernel has no formula) and
    frozen weights (the counter trips over the 'map' pool's trainable latent query otherwise)."""
    model.requires_grad_(False)
    with sdpa_kernel(SDPBackend.MATH):
        return flop_counter_macs(model, x)


def attention_pool_macs(pool, tokens):
    """timm's AttentionPoolLatent over `tokens` keys: keys/values of every token, the latent query's projection,
    q.k and attn.v, output projection and MLP on the latent."""
    latents = pool.latent_len
    return (tokens * pool.kv.in_features * pool.kv.out_features + 2 * latents * tokens * pool.kv.out_features // 2
            + latents * sum(layer.in_features * layer.out_features
                            for layer in (pool.q, pool.proj, pool.mlp.fc1, pool.mlp.fc2)))


def beyond_the_blocks(model, backbone, pooled_tokens):
    """MACs the counter sees and shared.flops.vit_macs does not: the prefix slots of the patch embedding counted
    there (minus), the attention pooling, a distillation head."""
    dims = model.patch_embed.proj
    macs = -backbone.num_prefix_tokens * dims.out_channels * dims.in_channels * dims.kernel_size[0] * dims.kernel_size[1]
    if model.attn_pool is not None:
        macs += attention_pool_macs(model.attn_pool, pooled_tokens)
    if backbone.has_distill_token:
        macs += model.head_dist.in_features * model.head_dist.out_features
    return macs


# ----------------------------------------------------------------------------------------------------------- DiffRate

def diffrate_schedule(n, depth):
    """Block 0 never compresses (the DiffRate ViT patch); prune and merge both act later."""
    prune = [n, n - 5, n - 9, n - 12, n - 14, n - 16][:depth]
    merge = [n, n - 7, n - 9, n - 15, n - 15, n - 18][:depth]
    return prune, merge


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_diffrate_keeping_every_token_is_the_unpatched_model(family):
    plain = build(family)
    x = images(family)
    with torch.no_grad():
        expected = plain(x)
    model = apply_patch(plain, 2, 2)
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    model.set_kept_num([n] * len(model.blocks), [n] * len(model.blocks))
    with torch.no_grad():
        logits, _ = model(x)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_diffrate_schedule_token_counts_prefix_tokens_and_flops(family):
    model = apply_patch(build(family), 2, 2, trace_source=True)
    backbone = describe(build(family))
    prefix, depth = backbone.num_prefix_tokens, backbone.depth
    n = model.patch_embed.num_patches + prefix
    prune, merge = diffrate_schedule(n, depth)
    model.set_kept_num(prune, merge)
    entering, leaving = [], []
    hooks = [b.register_forward_pre_hook(lambda m, a: entering.append(a[0].shape[1])) for b in model.blocks]
    hooks += [b.register_forward_hook(lambda m, a, o: leaving.append(o.shape[1])) for b in model.blocks]
    x = images(family, batch=1)
    with torch.no_grad():
        logits, flops = model(x)
    for h in hooks:
        h.remove()
    expected, running = [], n
    for p, m in zip(prune, merge):
        running = min(running, p, m)
        expected.append(running)
    assert leaving == expected and entering == [n] + expected[:-1]
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()

    # prefix tokens: still at 0..P-1, each holding only itself, size 1
    info = model._diffrate_info
    source, size = info['source'], info['size']
    assert torch.equal(source[:, :prefix, :prefix], torch.eye(prefix)[None])
    assert torch.all(source[:, :prefix].sum(-1) == 1) and torch.all(size[:, :prefix] == 1)
    assert torch.all(source[:, prefix:, :prefix] == 0)  # no patch token absorbed a prefix token

    # DiffRate's FLOPs: the project's convention (shared.flops: blocks and head) on these token counts
    dims, _ = vit_dims(model)
    pooled = leaving[-1] - prefix
    analytic = vit_macs(entering, leaving, **dims)
    assert flops == analytic
    # == counted; the counter also sees the class token's attention row (N x C a block, the ordering) and the
    # merge's cosine similarities (sources x destinations x C)
    extra = beyond_the_blocks(model, backbone, pooled)
    if backbone.has_class_token:
        extra += sum(t * backbone.embed_dim for t in entering)
    for t, p, m in zip(entering, prune, merge):
        mid = min(t, p)
        if m < mid:
            extra += (mid - m) * m * backbone.embed_dim
    assert counted_macs(model, x) == analytic + extra


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_diffrate_search_step_masks_patch_tokens_only_and_reaches_the_proxies(family):
    model = apply_patch(build(family), 2, 2).train()
    prefix = model.num_prefix_tokens
    logits, flops = model(images(family))
    mask = model._diffrate_info['mask'].detach()
    assert torch.all(mask[:, :prefix].round() == 1)
    assert int(mask[0].round().sum()) == model._diffrate_info['alive'] < mask.shape[1]
    (logits.logsumexp(-1).mean() + (flops / 1e9) ** 2).backward()
    grads = [p.grad for p in model.arch_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_diffrate_without_class_token_ranks_by_attention_received():
    from diffrate.vit import sort_by_importance
    attn = torch.tensor([[0.1, 0.2, 0.7], [0.3, 0.3, 0.4], [0.0, 0.5, 0.5]]).reshape(1, 1, 3, 3)
    # received, averaged over the 3 queries: token 0 0.133, token 1 0.333, token 2 0.533
    assert sort_by_importance(attn, prefix=0, class_token=False).tolist() == [[2, 1, 0]]
    # with one register kept first: patch tokens 1 and 2 ranked alone
    assert sort_by_importance(attn, prefix=1, class_token=False).tolist() == [[0, 2, 1]]
    # the search's masked query (token 2) no longer votes: token 1 receives 0.25, token 2 0.55
    weight = torch.tensor([[1., 1., 0.]])
    assert sort_by_importance(attn, prefix=1, class_token=False, query_weight=weight).tolist() == [[0, 2, 1]]
    # class token: its own row only
    assert sort_by_importance(attn, prefix=1, class_token=True).tolist() == [[0, 2, 1]]


@pytest.mark.parametrize('family', sorted(REFUSED))
def test_diffrate_and_avit_refuse_what_they_cannot_honour(family):
    name, kwargs, reason = REFUSED[family]
    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(UnsupportedBackbone, match=f'^DiffRate cannot be applied .*{reason}'):
        apply_patch(model)
    with pytest.raises(UnsupportedBackbone, match=f'^A-ViT cannot be applied .*{reason}'):
        adaptive_from_timm(model)


def test_pools_without_a_size_weighted_or_any_form_are_refused():
    with pytest.raises(UnsupportedBackbone, match="^DiffRate cannot .*global_pool='max'"):
        apply_patch(build('vit_gap', global_pool='max'))
    with pytest.raises(UnsupportedBackbone, match="^A-ViT cannot .*global_pool=''"):
        adaptive_from_timm(build('vit_gap', global_pool=''))
    adaptive_from_timm(build('vit_gap', global_pool='max'))  # a max over halting-weighted states is fine


# -------------------------------------------------------------------------------------------------------------- A-ViT

def varied_gates(model):
    """Gates low enough that random-weight tokens halt at many depths."""
    model.gate_scale, model.gate_center = 5., 0.5
    return model


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_avit_never_halting_is_the_unpatched_model(family):
    plain = build(family)
    x = images(family)
    with torch.no_grad():
        expected = plain(x)
        model = adaptive_from_timm(plain, gate_center=1e4)
        assert torch.equal(model(x), expected)
    assert torch.all(model.counter_token == len(model.blocks))


class PackedShapes:
    """Token counts entering each block of the zipped path."""

    def __init__(self, monkeypatch):
        self.seen = []
        block = act.packed_block
        monkeypatch.setattr(act, 'packed_block', lambda b, x, bias: self.seen.append(x.shape[1]) or block(b, x, bias))


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_avit_zipped_token_counts_prefix_tokens_and_flops(family, monkeypatch):
    backbone = describe(build(family))
    prefix, depth = backbone.num_prefix_tokens, backbone.depth
    model = varied_gates(adaptive_from_timm(build(family)))
    x = images(family, batch=1)
    model.zip_tokens = False
    with torch.no_grad():
        masked = model(x)
    masked_counter = model.counter_token.clone()
    model.zip_tokens = True
    shapes = PackedShapes(monkeypatch)
    with torch.no_grad():
        zipped = model(x)
    counter = model.counter_token
    assert torch.equal(counter, masked_counter)
    torch.testing.assert_close(zipped, masked, rtol=0, atol=1e-5)
    # block l runs the tokens whose depth is at least l + 1, as the masked loop's counters say
    tokens = [int((masked_counter >= layer).sum()) for layer in range(1, depth + 1)]
    assert shapes.seen == tokens[:len(shapes.seen)] and tokens[len(shapes.seen):] == [0] * (depth - len(shapes.seen))
    assert counter.min() < depth  # tokens did halt
    if backbone.num_registers:  # registers never halt
        first = prefix - backbone.num_registers
        assert torch.all(counter[:, first:prefix] == depth)
    # analytic (the project's per-image MACs from the depth counters) == counted
    pooled = counter.shape[1] - (0 if model.pool_include_prefix else prefix)
    expected = float(per_image_macs(model, counter)[0]) + beyond_the_blocks(model, backbone, pooled)
    assert counted_macs(model, x) == expected


def test_avit_pack_blocks_bound_the_host_reads(monkeypatch):
    """Packing after chosen blocks reads the device at most that many times, and gives the depth counters of the
    per-block packing and its outputs within float rounding (the padded sequences sum in another order)."""
    model = varied_gates(adaptive_from_timm(build('dinov2_reg', depth=6)))
    x = images('dinov2_reg', batch=3)
    reads = []
    read = act.AdaptiveComputation._host_read
    monkeypatch.setattr(act.AdaptiveComputation, '_host_read', staticmethod(lambda t: reads.append(1) or read(t)))
    with torch.no_grad():
        every_block = model(x)
        counter, rho = model.counter_token.clone(), model.rho_token.clone()
        assert 0 < len(reads) <= 5
        assert len(torch.unique(counter)) > 2
        for blocks in ((), (2,), (1, 3)):
            reads.clear()
            model.zip_pack_blocks = blocks
            out = model(x)
            assert len(reads) == len(blocks)
            assert torch.equal(model.counter_token, counter)
            torch.testing.assert_close(model.rho_token, rho, rtol=0, atol=1e-5)
            torch.testing.assert_close(out, every_block, rtol=0, atol=1e-5)


def test_avit_training_forward_on_registers_keeps_them_going():
    """The masked loop (training) on a register model: registers never halt, the ponder loss reaches the gates'
    inputs, every gradient is finite."""
    model = varied_gates(adaptive_from_timm(build('dinov2_reg'))).train()
    logits = model(images('dinov2_reg'))
    assert torch.all(model.counter_token[:, 1:5] == len(model.blocks))
    (logits.logsumexp(-1).mean() + model.rho_token.mean()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_diffrate_model_names_pick_the_generic_patch_for_timm_vits():
    from diffrate.models import apply_diffrate, patch_kind
    assert patch_kind('vit_small_patch14_reg4_dinov2') == 'vit' and patch_kind('vit_base_patch16_mae') == 'mae'
    model = apply_diffrate(build('dinov2_reg'), FAMILIES['dinov2_reg'][0], 2)
    assert model._diffrate_info['prefix'] == 5 and model.blocks[1].prune_ddp.kept_token_number > 5
    with pytest.raises(ValueError, match="start with 'vit_'"):
        patch_kind('eva02_tiny_patch14_224')
