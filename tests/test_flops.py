"""shared.flops: the analytic MAC count equals torch's FlopCounterMode / 2 on the same forwards (full and with tokens
dropped inside and between blocks), and tools/flops.py gives the papers' DeiT numbers."""
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from shared.flops import flop_counter_macs, model_macs, vit_dims, vit_macs


def counted_macs(fn, batch):
    """FlopCounterMode / 2 per image, computed here independently of shared.flops."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops() / 2 / batch


def small_vit(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7, mlp_ratio=4.0)
    cfg.update(kw)
    model = timm.models.vision_transformer.VisionTransformer(**cfg).eval()
    for m in model.modules():  # the counter has no formula for the fused CPU attention kernel
        if hasattr(m, 'fused_attn'):
            m.fused_attn = False
    return model


def class_slot_macs(model):
    """vit_macs counts the patch embedding with the class slot included (DiffRate's convention); the counter
    sees only the real patches."""
    dims, _ = vit_dims(model)
    return dims['embed_dim'] * dims['in_chans'] * dims['patch_size'] ** 2


@pytest.mark.parametrize('cfg', [{}, dict(img_size=48, patch_size=16, embed_dim=64, depth=2, num_heads=4),
                                 dict(mlp_ratio=2.0, num_classes=0)])
def test_full_forward_matches_flop_counter(cfg):
    model = small_vit(**cfg)
    x = torch.randn(2, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1])
    counted = counted_macs(lambda: model(x), 2)
    assert model_macs(model) == pytest.approx(counted + class_slot_macs(model), rel=1e-9)
    assert flop_counter_macs(model, x) == pytest.approx(counted, rel=1e-9)


def test_token_counts_drive_the_count():
    """Tokens dropped between blocks and, inside a block, between attention and MLP (where ToMe/DiffRate reduce)."""
    model = small_vit(depth=4)
    x = torch.randn(3, 3, 32, 32)
    attn_keep = [17, 12, 9, 5]    # tokens entering each block's attention
    mlp_keep = [14, 12, 5, 3]    # tokens left for each block's MLP

    def reduced_forward():
        t = model._pos_embed(model.patch_embed(x))
        for blk, n_attn, n_mlp in zip(model.blocks, attn_keep, mlp_keep):
            t = t[:, :n_attn]
            t = t + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(t))))
            t = t[:, :n_mlp]
            t = t + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t))))
        return model.forward_head(model.norm(t))

    counted = counted_macs(reduced_forward, 3)
    dims, _ = vit_dims(model)
    assert vit_macs(attn_keep, mlp_keep, **dims) == pytest.approx(counted + class_slot_macs(model), rel=1e-9)
    assert model_macs(model, attn_keep, mlp_keep) == vit_macs(attn_keep, mlp_keep, **dims)
    # fractional (image-averaged) counts are allowed and interpolate
    half = vit_macs([16.5] * 4, **dims)
    assert vit_macs([16] * 4, **dims) < half < vit_macs([17] * 4, **dims)
    with pytest.raises(ValueError):
        vit_macs([17, 17], [17], **dims)


def test_deit_tiny_at_224_matches_counter():
    model = small_vit(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=1000)
    x = torch.randn(1, 3, 224, 224)
    assert model_macs(model) == pytest.approx(flop_counter_macs(model, x) + class_slot_macs(model), rel=1e-9)
    assert model_macs(model) / 1e9 == pytest.approx(1.2538, abs=5e-5)


@pytest.mark.parametrize('name,expected', [('deit_tiny_patch16_224', '1.254'), ('deit_small_patch16_224', '4.599'),
                                           ('deit_base_patch16_224', '17.564')])
def test_tools_flops_cli(name, expected, capsys):
    from tools.flops import main
    main(['--model', name])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f'GFLOPs={expected}'
