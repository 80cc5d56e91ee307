"""A-ViT model: the halting loop's invariants, equality with a plain ViT at full depth, zipped == masked, losses."""
import math

import pytest
import timm
import torch

from avit.models_act import (AdaptiveVisionTransformer, avit_models, distribution_prior_loss, distribution_target)


def tiny(**kw):
    # DeiT-Tiny widths on a 64 px input (16 patches + class token): the real layer stack, cheap on a CPU.
    kw.setdefault('num_classes', 10)
    kw.setdefault('img_size', 64)
    return avit_models['avit_tiny_patch16_224'](**kw)


def with_varied_depths(model):
    """Gates low enough that tokens halt at many different depths with random weights."""
    model.gate_scale, model.gate_center = 5., 0.5
    for i, blk in enumerate(model.blocks):
        blk.mlp.fc2.bias.data[0] += 0.05 * i
    return model


def test_registry_and_state_dict_is_timm_vit():
    torch.manual_seed(0)
    for name, vit in (('avit_tiny_patch16_224', 'vit_tiny_patch16_224'),
                      ('avit_small_patch16_224', 'vit_small_patch16_224')):
        model = avit_models[name](num_classes=1000)
        assert isinstance(model, AdaptiveVisionTransformer)
        plain = timm.create_model(vit, pretrained=False)
        result = plain.load_state_dict(model.state_dict())
        assert not result.missing_keys and not result.unexpected_keys
        result = model.load_state_dict(plain.state_dict())
        assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in avit_models['avit_tiny_patch16_224']().parameters()) == 5717416


def test_depth_counters_and_ponder_invariants():
    torch.manual_seed(0)
    model = with_varied_depths(tiny(zip_tokens=False)).eval()
    model(torch.randn(3, 3, 64, 64))
    n, rho = model.counter_token, model.rho_token
    assert n.shape == rho.shape == (3, 17)
    assert torch.equal(n, n.round())
    assert n.min() >= 1 and n.max() <= 12
    assert len(torch.unique(n)) > 3, 'the biased gates should give many depths'
    remainder = rho - n
    assert remainder.min() >= -1e-6 and remainder.max() <= 1 + 1e-6
    assert len(model.halting_score_layer) == 12


def test_huge_gate_center_is_full_depth_plain_vit():
    torch.manual_seed(0)
    model = tiny(gate_scale=10., gate_center=1e4).eval()
    plain = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=64).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        reference = plain(x)
    assert torch.all(model.counter_token == 12)
    assert torch.allclose(model.rho_token, torch.full_like(model.rho_token, 13.))  # N_k + r_k = 12 + 1
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize('batch', [1, 4])
def test_zipped_equals_masked(batch):
    torch.manual_seed(1)
    model = with_varied_depths(tiny(zip_tokens=False)).eval()
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        masked_features = model.forward_features(x)
        masked = model.forward_head(masked_features)
        counters, rho = model.counter_token.clone(), model.rho_token.clone()
        model.zip_tokens = True
        zipped_features = model.forward_features(x)
        zipped = model(x)
    assert torch.equal(model.counter_token, counters)
    torch.testing.assert_close(model.rho_token, rho, atol=1e-5, rtol=0)
    # Every token's halting-weighted state, not only the classified class token.
    torch.testing.assert_close(zipped_features, masked_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(zipped, masked, atol=1e-5, rtol=0)
    assert counters.min() < 12  # something was actually removed
    if batch > 1:  # images kept different token counts somewhere, so the padded, key-masked packing was used
        active = torch.stack([(counters > layer).sum(1) for layer in range(12)])
        assert any(len(torch.unique(row)) > 1 for row in active)


def test_zipped_image_with_every_token_halted_next_to_a_deep_one():
    """Image 0 halts completely in block 1 and rides along as pure padding (every key masked) while image 1 goes on."""
    torch.manual_seed(2)
    model = tiny(gate_scale=1., gate_center=0., zip_tokens=False).eval()
    with torch.no_grad():
        # Channel 0 (the halting input) leaves block 1 as it entered: the patch's pixel sum, +1 for the class token.
        block = model.blocks[0]
        for layer in (block.attn.proj, block.mlp.fc2):
            layer.weight[0] = 0.
            layer.bias[0] = 0.
        model.patch_embed.proj.weight[0] = 1.
        model.patch_embed.proj.bias[0] = 0.
        model.pos_embed[..., 0] = 0.
        model.cls_token[..., 0] = 100.
        x = torch.randn(2, 3, 64, 64).abs()
        x[1] *= -1  # image 0: positive sums, score ~1, halts; image 1: negative sums, score ~0, goes on
        masked = model(x)
        counters, rho = model.counter_token.clone(), model.rho_token.clone()
        model.zip_tokens = True
        zipped = model(x)
    assert torch.all(counters[0] == 1) and torch.all(counters[1, 1:] > 1)
    assert torch.equal(model.counter_token, counters)
    # Padding slots repeat image 0's positions; they must add exactly nothing there (ponder = 1 + remainder 1).
    assert torch.equal(model.rho_token[0], rho[0]) and torch.all(rho[0] == 2)
    torch.testing.assert_close(zipped, masked, atol=1e-5, rtol=0)


def test_evaluation_zips_by_default_and_training_masks():
    torch.manual_seed(1)
    model = with_varied_depths(tiny()).eval()
    assert model.zip_tokens
    x = torch.randn(3, 3, 64, 64)
    calls = []
    model.forward_features_act_token = lambda *a: calls.append('masked')
    with torch.no_grad():
        zipped = model(x)
    assert calls == [] and model.halting_score_layer == []  # the zipped path ran (it records no prior statistic)
    del model.forward_features_act_token
    model.zip_tokens = False
    with torch.no_grad():
        masked = model(x)
    assert len(model.halting_score_layer) == 12
    torch.testing.assert_close(zipped, masked, atol=1e-5, rtol=0)


def test_zipped_path_only_at_inference():
    model = with_varied_depths(tiny(zip_tokens=True)).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()  # the masked loop: differentiable
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_ponder_gradient_reaches_the_gates():
    torch.manual_seed(0)
    model = with_varied_depths(tiny()).train()
    model(torch.randn(2, 3, 64, 64))
    ponder = model.rho_token.mean()
    ponder.backward()
    # Channel 0 of each block output is the halting input; the MLP's output bias feeds it directly.
    gate_grads = torch.stack([blk.mlp.fc2.bias.grad[0] for blk in model.blocks[:-1]])
    assert torch.count_nonzero(gate_grads) > 0
    # Only through the remainder: the last block's score is forced to 1, so its gate gets nothing.
    assert model.blocks[-1].mlp.fc2.bias.grad is None or model.blocks[-1].mlp.fc2.bias.grad[0] == 0


def test_straight_through_zeroing_keeps_halted_rows_gradient():
    """The official `out.data *= mask` zeroes halted rows in the forward but lets their gradient through (the KL
    prior's per-layer statistic reads the scores of halted tokens, so their rows do get a gradient)."""
    torch.manual_seed(0)
    model = with_varied_depths(tiny()).train()
    model.drop_path_rate = 0
    x = torch.randn(2, 3, 64, 64)
    target = distribution_target()

    def loss():
        logits = model(x)
        return logits.sum() + distribution_prior_loss(model.halting_score_layer, target)
    loss().backward()
    grad_st = model.pos_embed.grad.clone()
    model.zero_grad()
    # The same forward with a plain multiplication instead gives different parameter gradients.
    import avit.models_act as m
    source = m.AdaptiveVisionTransformer.forward_features_act_token

    def plain_mul(self, x):
        orig = torch.Tensor.detach
        try:
            torch.Tensor.detach = lambda t: t  # X + (X*a - X) == X*a with the gradient of X*a
            return source(self, x)
        finally:
            torch.Tensor.detach = orig
    model.forward_features_act_token = plain_mul.__get__(model)
    loss().backward()
    assert not torch.allclose(model.pos_embed.grad, grad_st)


def test_distribution_target_and_prior_loss():
    t = distribution_target()
    assert abs(float(t.sum()) - 3.2605) < 1e-3
    assert abs(float(t[8]) - 1.300918) < 1e-5
    assert abs(float(t[:8].sum()) - 0.98) < 1e-6
    h = [torch.tensor(v) for v in torch.linspace(0.05, 0.6, 12).tolist()]
    loss = distribution_prior_loss(h, t)
    hs = torch.stack(h)
    hs = (hs / hs.sum()).clamp(0.01, 0.99)
    expected = sum(float(ti) * (math.log(float(ti)) - math.log(float(hi))) for ti, hi in zip(t, hs)) / 12
    assert abs(float(loss) - expected) < 1e-4 * abs(expected)
    assert float(loss) > 0
    normalised = distribution_prior_loss(h, t, normalize_target=True)
    assert float(normalised) != pytest.approx(float(loss))


def test_prior_statistic_axis_switch():
    torch.manual_seed(0)
    model = with_varied_depths(tiny(zip_tokens=False)).eval()
    x = torch.randn(3, 3, 64, 64)
    model(x)
    quirk = torch.stack(model.halting_score_layer)
    model.prior_batch_axis_quirk = False
    model(x)
    tokens = torch.stack(model.halting_score_layer)
    assert not torch.allclose(quirk, tokens)


@pytest.mark.heavy  # dynamo tracing of the 12-block model: over a minute a case on 2 cores (tests/test_compile.py
# checks the graph count of a 2-block model in the fast suite)
@pytest.mark.parametrize('batch', [1, 4])
def test_zipped_path_compiles_as_one_graph_with_the_eager_results(batch):
    """No host sync in the compiled loop: one graph, no break (dynamo's explain), and with the graph run as traced
    (backend 'eager') the depth counters, ponder costs and logits of the eager zipped path, bit for bit."""
    torch.manual_seed(1)
    model = with_varied_depths(tiny()).eval()
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        eager = model(x)
        counters, rho = model.counter_token.clone(), model.rho_token.clone()
    assert counters.min() < 12
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        explained = torch._dynamo.explain(model)(x)
        compiled = torch.compile(model, backend='eager', fullgraph=True)(x)
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert torch.equal(compiled, eager)
    assert torch.equal(model.counter_token, counters) and torch.equal(model.rho_token, rho)
