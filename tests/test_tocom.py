"""ToCom: compensator algebra, folding, official checkpoint format, models, bad inputs."""
import copy
import random

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from shared.checkpoint import CheckpointError
from shared.tome import apply_patch
from tocom.engine import sample_pair
from tocom.models import (MODELS, Compensator, add_compensator, compensator_state_dict, create_tocom_model,
                          fold_compensator, is_tocom, load_compensator, set_r)


def randomise(model, std=0.05):
    """Give the (zero-initialised) up-projections weights so that compensation is visible."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if 'adapter_up' in name:
            torch.nn.init.normal_(p, std=std)
    return model


def tiny_tocom(scale=0.1, dim=32, steps=16, group=2):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=dim, depth=3, num_heads=2, num_classes=5)
    return randomise(add_compensator(apply_patch(vit), steps * group, scale, steps)).eval()


# ---------------------------------------------------------------- the compensator's step arithmetic
@pytest.fixture
def comp():
    torch.manual_seed(0)
    c = Compensator(24, 32, steps=16)
    torch.nn.init.normal_(c.adapter_up.weight)
    return c.eval()


def test_step_groups_own_their_channels(comp):
    for k in range(1, 17):
        mask = comp.mask(k, k - 1)
        on = mask.nonzero().flatten().tolist()
        assert on == list(range(32 - 2 * k, 32 - 2 * (k - 1)))  # step k = 2 channels, counted from the end
        assert torch.equal(comp.mask(k - 1, k), -mask)


@pytest.mark.parametrize('a,b,c', [(0, 5, 16), (3, 9, 1), (16, 2, 7), (4, 4, 10)])
def test_delta_is_additive_and_antisymmetric(comp, a, b, c):
    x = torch.randn(2, 7, 24)
    d = lambda t, s: comp(x, t, s)  # noqa: E731  delta(x; r_tgt=t, r_src=s) = P_{s -> t}
    assert torch.allclose(d(b, a) + d(c, b), d(c, a), atol=1e-5)  # P_{a->b} + P_{b->c} = P_{a->c}
    assert torch.allclose(d(a, b), -d(b, a), atol=1e-6)          # P_{b->a} = -P_{a->b}
    assert torch.count_nonzero(d(a, a)) == 0
    # the summed steps equal the sum of unit steps
    lo, hi = min(a, c), max(a, c)
    unit = sum((d(k, k - 1) for k in range(lo + 1, hi + 1)), torch.zeros_like(x))
    assert torch.allclose(d(hi, lo), unit, atol=1e-5)


def test_delta_weight_matches_forward(comp):
    x = torch.randn(3, 5, 24)
    assert torch.allclose(comp(x, 12, 3), x @ comp.delta_weight(12, 3).T, atol=1e-5)


def test_r_outside_trained_range(comp):
    for bad in ((17, 0), (0, -1), (-1, 3)):
        with pytest.raises(ValueError, match='outside the range'):
            comp(torch.randn(1, 2, 24), *bad)
    with pytest.raises(ValueError, match='multiple'):
        Compensator(24, 30, steps=16)


# ---------------------------------------------------------------- the model
def test_scale_zero_equals_plain_tome():
    model = tiny_tocom(scale=0.0)
    plain = copy.deepcopy(model)
    plain_tome = apply_patch(VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                                               num_classes=5)).eval()
    plain_tome.load_state_dict({k: v for k, v in plain.state_dict().items() if 'adapter' not in k})
    x = torch.randn(2, 3, 32, 32)
    for r_tgt, r_src in ((4, 0), (0, 8), (8, 8)):
        set_r(model, r_tgt, r_src)
        plain_tome.r = r_tgt
        assert torch.allclose(model(x), plain_tome(x), atol=1e-6)


def test_equal_degrees_run_no_adapter():
    model = tiny_tocom()
    calls = []
    for blk in model.blocks:
        blk.attn.q_tocom.register_forward_hook(lambda *a: calls.append(1))
        blk.attn.v_tocom.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    set_r(model, 5, 5)
    model(x)
    assert calls == []
    set_r(model, 5, 2)
    model(x)
    assert len(calls) == 2 * 3


def test_compensation_changes_output_and_merges_r_tgt():
    model = tiny_tocom()
    x = torch.randn(2, 3, 32, 32)
    set_r(model, 6, 6)
    base = model(x)
    set_r(model, 6, 0)
    comp = model(x)
    assert not torch.allclose(base, comp)
    assert model._tome_info['size'].shape[1] == 65 - 3 * 6  # only r_tgt tokens are merged


def test_tocom_block_peak_memory_not_above_timm_at_equal_degrees():
    # ToComBlock runs ToMeBlock's forward, which frees the attention output before the MLP; the CPU tracker is
    # deterministic (dispatcher-counted storages freed by reference count), see tests/test_tome.py
    from shared.benchmark import peak_forward_memory_mb
    torch.manual_seed(0)
    plain = VisionTransformer(img_size=16, patch_size=4, embed_dim=128, depth=1, num_heads=2, num_classes=3).eval()
    tocom = add_compensator(apply_patch(copy.deepcopy(plain)), tocom_dim=32).eval()
    x = torch.randn(16, 17, 128)
    timm_peak = peak_forward_memory_mb(lambda: plain.blocks[0](x), 'cpu')
    tocom._tome_info.update(r=[[0, 0]], size=None, source=None)
    assert peak_forward_memory_mb(lambda: tocom.blocks[0](x), 'cpu') <= timm_peak
    assert tocom._tome_info['r'] == []  # the block consumed its [r_tgt, r_src] pair


@pytest.mark.parametrize('pair', [(8, 0), (0, 8), (16, 3), (5, 5)])
def test_fold_equals_unfolded(pair):
    model = tiny_tocom(scale=0.15)
    x = torch.randn(2, 3, 32, 32)
    set_r(model, *pair)
    with torch.no_grad():
        ref = model(x)
        folded = fold_compensator(model, *pair)
        out = folded(x)
    assert (out - ref).abs().max() < 1e-5
    assert not is_tocom(folded) and folded.r == pair[0]
    assert not any('adapter' in n for n, _ in folded.named_parameters())  # zero extra FLOPs: a plain ToMe ViT
    assert is_tocom(model)  # the original is untouched


def test_official_keys_shapes_and_trainable_count():
    model = MODELS['deit_base_patch16_224_tocom'](num_classes=10, tocom_dim=32)
    sd = compensator_state_dict(model)
    assert len(sd) == 48
    assert sd['blocks.0.attn.q_tocom.adapter_down.weight'].shape == (32, 768)
    assert sd['blocks.11.attn.v_tocom.adapter_up.weight'].shape == (768, 32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(sd)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_179_648
    assert torch.count_nonzero(sd['blocks.3.attn.q_tocom.adapter_up.weight']) == 0  # zero-init up projection


def test_names_resolve_without_touching_timm():
    import timm
    plain = create_tocom_model('deit_tiny_patch16_224', num_classes=3, img_size=32, tocom_scale=0.3)
    assert hasattr(plain, '_tome_info') and not is_tocom(plain)
    assert not hasattr(timm.create_model('deit_tiny_patch16_224', num_classes=3), '_tome_info')
    generic = create_tocom_model('vit_digits_patch4_32_tocom', tocom_dim=8, tocom_steps=4)  # any width, any r range
    assert generic.blocks[0].attn.q_tocom.adapter_down.weight.shape == (8, 64)
    set_r(generic, 4, 0)
    generic(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match='0..4'):
        set_r(generic, 5, 0)


def test_forward_rejects_bad_schedules():
    model = tiny_tocom()
    x = torch.randn(1, 3, 32, 32)
    model.r = [[17, 0]] * 3
    with pytest.raises(ValueError, match='outside the range'):
        model(x)
    model.r = 4
    with pytest.raises(TypeError, match='r_tgt, r_src'):
        model(x)


def test_load_compensator_checks(tmp_path):
    src = tiny_tocom()
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': {n: p for n, p in src.named_parameters() if p.requires_grad}}, path)
    dst = tiny_tocom()
    for p in dst.parameters():
        torch.nn.init.zeros_(p) if p.requires_grad else None
    load_compensator(dst, path)
    assert all(torch.equal(a, b) for a, b in zip(compensator_state_dict(src).values(),
                                                 compensator_state_dict(dst).values()))
    wide = tiny_tocom(dim=64)
    with pytest.raises(CheckpointError, match='width 32'):
        load_compensator(wide, path)
    fine = tmp_path / 'fine.pth'
    torch.save({'model': {k: v for k, v in src.state_dict().items() if 'adapter' not in k}}, fine)
    with pytest.raises(CheckpointError, match='no compensator'):
        load_compensator(dst, fine)


# ---------------------------------------------------------------- pre-training pieces
def test_sample_pair():
    rng = random.Random(0)
    pairs = [sample_pair(rng) for _ in range(2000)]
    assert all(m != n for m, n in pairs)
    assert {m for m, _ in pairs} == set(range(17)) and {n for _, n in pairs} == set(range(17))


def test_self_distillation_loss_goes_down():
    """The compensator n -> m learns to make the model at r = m imitate the frozen model at r = n."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    torch.nn.init.normal_(vit.head.weight, std=2.0)  # random-init heads give near-uniform logits: nothing to learn
    teacher = apply_patch(copy.deepcopy(vit)).eval()
    student = add_compensator(apply_patch(vit), 32, tocom_scale=1.0)
    student.eval()  # no dropout: a deterministic objective for the test
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)  # Adam overshoots from the zero-initialised up-projection at larger rates
    x = torch.randn(8, 3, 32, 32)
    teacher.r = 0
    with torch.no_grad():
        target = F.log_softmax(teacher(x), -1)
    losses = []
    for _ in range(40):
        set_r(student, 12, 0)
        loss = F.kl_div(F.log_softmax(student(x), -1), target, reduction='batchmean', log_target=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.5 * losses[0]
    frozen = [p for n, p in student.named_parameters() if 'adapter' not in n]
    assert all(p.grad is None for p in frozen)


# ---------------------------------------------------------------- measure hooks
def test_tome_gflops_match_the_project_convention():
    from tocom.measure import model_gflops
    base = create_tocom_model('deit_base_patch16_224')
    small = create_tocom_model('deit_small_patch16_224')
    # the figures to within their last digit (exact: 13.1045, 10.3676, 3.4168, 2.7030)
    for model, figures in ((base, (17.564, 13.104, 10.367, 8.772)), (small, (4.599, 3.416, 2.703, 2.291))):
        for r, expected in zip((0, 8, 13, 16), figures):
            assert abs(model_gflops(model, r) - expected) < 1e-3
    # a folded compensator is free; the unfolded one costs 2 adapters x 2 projections per token and block
    tocom = add_compensator(base)
    assert model_gflops(tocom, 16, r_src=0) == model_gflops(base, 16)
    assert model_gflops(tocom, 16, r_src=0, unfolded=True) > model_gflops(base, 16) + 0.12


def test_benchmark_hook_runs(capsys):
    import argparse
    from tocom.measure import add_benchmark_args, benchmark
    parser = argparse.ArgumentParser()
    add_benchmark_args(parser)
    args = parser.parse_args(['--model', 'deit_tiny_patch16_224', '--input-size', '32', '--batch-size', '2',
                              '--runs', '1', '--warmup', '0', '--rounds', '1', '--device', 'cpu', '--r', '1', '4'])
    out = benchmark(args)
    assert [row['r'] for row in out['rows']] == [0, 1, 4] and out['rows'][0]['speedup'] == 1.0
    assert 'speed-up' in capsys.readouterr().out


def test_teacher_is_built_at_the_input_size(tmp_path):
    """The pre-training teacher is built at --input-size for any timm name (a DINOv2 checkpoint saved at 56 px used
    to meet a 518-px teacher and fail to load)."""
    import argparse

    import timm

    from tocom.main import load_teacher
    source = timm.create_model('vit_small_patch14_reg4_dinov2', pretrained=False, num_classes=10, img_size=56)
    path = tmp_path / 'dino.pth'
    torch.save(source.state_dict(), path)
    args = argparse.Namespace(teacher_model='vit_small_patch14_reg4_dinov2', teacher_path=str(path), input_size=56)
    try:
        teacher = load_teacher(args, 10, 'cpu')
    except Exception as e:  # a (1, 16, C) embedding against the 37x37 grid of the name's default 518 px
        pytest.fail(str(e))
    assert teacher.pos_embed.shape == source.pos_embed.shape
