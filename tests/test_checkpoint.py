"""shared.checkpoint: safe loading, atomic save, DeiT-style save/resume, readable mismatch errors, conversions."""
import argparse
import os
import pickle
import random

import numpy as np
import pytest
import timm
import torch

from shared.checkpoint import (CheckpointError, CheckpointMismatchError, UnsafeCheckpointError, atomic_save,
                               auto_resume, load_weights, resume, safe_load, save_checkpoint)


def tiny_vit(**kw):
    cfg = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=5)
    cfg.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**cfg)


# ------------------------------------------------------------------ safe loading


def test_namespace_and_numpy_values_load(tmp_path):
    obj = {'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(lr=0.1, model='x', betas=[0.9, 0.99]),
           'best': np.float64(81.5), 'step': np.int64(3), 'arr': np.arange(3), 'dt': np.dtype('float32')}
    path = tmp_path / 'c.pth'
    torch.save(obj, path)
    got = safe_load(path)
    assert got['args'].lr == 0.1 and got['args'].betas == [0.9, 0.99]
    assert got['best'] == 81.5 and got['step'] == 3 and got['arr'].tolist() == [0, 1, 2]
    assert torch.equal(got['model']['w'], torch.ones(2))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')
def test_pickle_payload_is_refused_not_executed(tmp_path):
    marker = tmp_path / 'executed'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'x': _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match='system') as e:
        safe_load(path)
    assert 'not unpickled' in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()
    # a plain (non-torch) pickle with a payload is refused too
    plain = tmp_path / 'plain.pth'
    with open(plain, 'wb') as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(CheckpointError):
        safe_load(plain)
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / 'c.pth'
    torch.save({'model': tiny_vit().state_dict()}, path)
    data = path.read_bytes()
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='cut.pth.*truncated'):
        safe_load(cut)
    with pytest.raises(CheckpointError, match='not found'):
        safe_load(tmp_path / 'nope.pth')
    with pytest.raises(CheckpointError, match='never downloaded'):
        safe_load('https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth')


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / 'c.pth'
    atomic_save({'v': torch.tensor(1)}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError('boom while saving')
    with pytest.raises(RuntimeError, match='boom'):
        atomic_save({'v': Unsaveable()}, path)
    assert safe_load(path)['v'].item() == 1
    assert os.listdir(tmp_path) == ['c.pth']  # no temporary left behind


# ------------------------------------------------------------------ mismatches


def test_checkpoint_of_another_model_names_keys():
    model = tiny_vit()
    other = tiny_vit(num_classes=7, depth=3)
    with pytest.raises(CheckpointMismatchError) as e:
        load_weights(model, other.state_dict())
    msg = str(e.value)
    assert 'blocks.2.attn.qkv.weight' in msg and 'unexpected' in msg
    assert 'head.weight: checkpoint (7, 24) vs model (5, 24)' in msg
    with pytest.raises(CheckpointMismatchError, match=r'missing keys \(12\): blocks.2.norm1.weight'):
        load_weights(tiny_vit(depth=3), {k: v for k, v in model.state_dict().items()})
    # strict=False tolerates missing keys but not shape mismatches
    result = load_weights(tiny_vit(depth=3), model.state_dict(), strict=False)
    assert any(k.startswith('blocks.2') for k in result.missing_keys)


# ------------------------------------------------------------------ save / resume


def _training_state(seed=0):
    torch.manual_seed(seed)
    model = tiny_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    from timm.scheduler import CosineLRScheduler
    scheduler = CosineLRScheduler(optimizer, t_initial=10, warmup_t=2, warmup_lr_init=1e-5)
    from timm.utils import ModelEmaV2
    ema = ModelEmaV2(model, decay=0.9)
    from shared.amp import NativeScaler
    return model, optimizer, scheduler, ema, NativeScaler('cpu')


def _step(model, optimizer, ema):
    x = torch.randn(4, 3, 16, 16)
    loss = model(x).logsumexp(-1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ema.update(model)


def test_save_then_resume_restores_everything(tmp_path):
    model, optimizer, scheduler, ema, scaler = _training_state()
    _step(model, optimizer, ema)
    scheduler.step(1)
    args = argparse.Namespace(output_dir=str(tmp_path), resume='', auto_resume=True, start_epoch=0, eval=False)
    random.seed(5)
    np.random.seed(6)
    save_checkpoint(tmp_path / 'checkpoint.pth', model=model, optimizer=optimizer, lr_scheduler=scheduler, epoch=3,
                    loss_scaler=scaler, model_ema=ema, args=args, best_acc=12.5)
    expect = (random.random(), np.random.rand(), torch.rand(1).item())

    ckpt = safe_load(tmp_path / 'checkpoint.pth')
    assert set(ckpt) >= {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args', 'rng'}
    assert ckpt['best_acc'] == 12.5 and ckpt['args'].output_dir == str(tmp_path)

    model2, optimizer2, scheduler2, ema2, scaler2 = _training_state(seed=1)
    assert auto_resume(args) == str(tmp_path / 'checkpoint.pth')
    torch.manual_seed(123)  # scramble the RNGs: resume must restore them
    assert resume(args, model2, optimizer2, scheduler2, scaler2, ema2) == 4 and args.start_epoch == 4
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.module.state_dict().values(), ema2.module.state_dict().values()):
        assert torch.equal(a, b)
    assert optimizer2.state_dict()['state'][0]['step'] == optimizer.state_dict()['state'][0]['step']
    assert optimizer2.param_groups[0]['lr'] == optimizer.param_groups[0]['lr']
    # one more identical step from both gives identical weights
    torch.manual_seed(9)
    _step(model, optimizer, ema)
    torch.manual_seed(9)
    _step(model2, optimizer2, ema2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_auto_resume_respects_flags(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path), resume='', auto_resume=True)
    assert auto_resume(args) == ''  # nothing to resume from yet
    atomic_save({'model': {}}, tmp_path / 'checkpoint.pth')
    args.auto_resume = False
    assert auto_resume(args) == ''
    args.auto_resume, args.resume = True, 'given.pth'
    assert auto_resume(args) == 'given.pth'


def test_resume_of_another_model_is_refused(tmp_path):
    atomic_save({'model': tiny_vit(num_classes=9).state_dict(), 'epoch': 0}, tmp_path / 'c.pth')
    args = argparse.Namespace(resume=str(tmp_path / 'c.pth'), eval=False, start_epoch=0)
    with pytest.raises(CheckpointMismatchError, match='c.pth.*head.weight'):
        resume(args, tiny_vit())


# ------------------------------------------------------------------ conversions


from shared.checkpoint import (convert_checkpoint, npz_to_timm_state_dict, resize_pos_embed,  # noqa: E402
                               to_timm_state_dict)


def _randomised(model, seed=0):
    """Random values everywhere (zero-initialised biases and heads would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _export_google_npz(model, path, prefix=''):
    """Write `model` in the Google ViT .npz layout (specs/tavt.md §3.4), including an ignored pre_logits."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    w = {'embedding/kernel': sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
         'embedding/bias': sd['patch_embed.proj.bias'], 'cls': sd['cls_token'],
         'Transformer/posembed_input/pos_embedding': sd['pos_embed'],
         'Transformer/encoder_norm/scale': sd['norm.weight'], 'Transformer/encoder_norm/bias': sd['norm.bias'],
         'head/kernel': sd['head.weight'].T, 'head/bias': sd['head.bias'],
         'pre_logits/kernel': np.ones((dim, dim), np.float32), 'pre_logits/bias': np.ones(dim, np.float32)}
    for i in range(len(model.blocks)):
        b, a = f'Transformer/encoderblock_{i}/', f'Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/'
        qkv_w = sd[f'blocks.{i}.attn.qkv.weight'].reshape(3, dim, dim)
        qkv_b = sd[f'blocks.{i}.attn.qkv.bias'].reshape(3, heads, dim // heads)
        for j, n in enumerate(('query', 'key', 'value')):
            w[f'{a}{n}/kernel'] = qkv_w[j].T.reshape(dim, heads, dim // heads)
            w[f'{a}{n}/bias'] = qkv_b[j]
        w[f'{a}out/kernel'] = sd[f'blocks.{i}.attn.proj.weight'].T.reshape(heads, dim // heads, dim)
        w[f'{a}out/bias'] = sd[f'blocks.{i}.attn.proj.bias']
        for src, dst in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_2')):
            w[f'{b}{dst}/scale'], w[f'{b}{dst}/bias'] = sd[f'blocks.{i}.{src}.weight'], sd[f'blocks.{i}.{src}.bias']
        for src, dst in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
            w[f'{b}MlpBlock_3/{dst}/kernel'] = sd[f'blocks.{i}.mlp.{src}.weight'].T
            w[f'{b}MlpBlock_3/{dst}/bias'] = sd[f'blocks.{i}.mlp.{src}.bias']
    np.savez(path, **{prefix + k: v for k, v in w.items()})


@pytest.mark.parametrize('prefix', ['', 'opt/target/'])
def test_google_npz_matches_timms_own_loader(tmp_path, prefix):
    from timm.models.vision_transformer import _load_weights
    source = _randomised(tiny_vit())
    path = str(tmp_path / 'ViT-tiny.npz')
    _export_google_npz(source, path, prefix)
    reference = tiny_vit().eval()
    _load_weights(reference, path)  # timm's independent reading of the same file
    ours = tiny_vit().eval()
    load_weights(ours, npz_to_timm_state_dict(path, ours))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max().item() < 1e-5
        assert (ours(x) - source(x)).abs().max().item() < 1e-5
    # another head size: the npz head is skipped, everything else loads
    other = tiny_vit(num_classes=3)
    sd = npz_to_timm_state_dict(path, other)
    assert 'head.weight' not in sd
    assert load_weights(other, sd, strict=False).missing_keys == ['head.weight', 'head.bias']


def test_npz_grid_resize_is_tavts_scipy_zoom(tmp_path):
    import scipy.ndimage
    source = _randomised(tiny_vit())  # 4x4 grid
    path = str(tmp_path / 'v.npz')
    _export_google_npz(source, path)
    bigger = tiny_vit(img_size=28)  # 7x7 grid
    sd = npz_to_timm_state_dict(path, bigger)
    old = source.pos_embed.detach()[0, 1:].reshape(4, 4, -1).numpy()
    zoomed = scipy.ndimage.zoom(old, (7 / 4, 7 / 4, 1), order=1)
    assert np.abs(sd['pos_embed'][0, 1:].reshape(7, 7, -1).numpy() - zoomed).max() < 1e-5
    assert torch.equal(sd['pos_embed'][0, 0], source.pos_embed.detach()[0, 0])
    load_weights(bigger, sd)


def test_resize_pos_embed_matches_timm_bicubic():
    from timm.layers import resample_abs_pos_embed
    pos = torch.randn(1, 2 + 36, 8)
    ours = resize_pos_embed(pos, (9, 9), num_prefix_tokens=2)
    ref = resample_abs_pos_embed(pos, (9, 9), num_prefix_tokens=2, interpolation='bicubic', antialias=False)
    assert ours.shape == (1, 83, 8) and torch.allclose(ours, ref, atol=1e-6)
    assert resize_pos_embed(pos, 6, num_prefix_tokens=2) is pos


@pytest.mark.parametrize('layout', ['deit', 'plain', 'ddp', 'ddp-deit'])
def test_deit_timm_and_ddp_layouts(tmp_path, layout):
    source = _randomised(tiny_vit())
    sd = source.state_dict()
    obj = {'deit': {'model': sd, 'optimizer': {}, 'epoch': 299, 'args': argparse.Namespace(model='deit_tiny')},
           'plain': sd,
           'ddp': {f'module.{k}': v for k, v in sd.items()},
           'ddp-deit': {'model': {f'module.{k}': v for k, v in sd.items()}}}[layout]
    path = tmp_path / 'c.pth'
    torch.save(obj, path)
    model = tiny_vit().eval()
    load_weights(model, convert_checkpoint(str(path), model))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_deit_checkpoint_at_another_resolution(tmp_path):
    source = _randomised(tiny_vit())
    torch.save({'model': source.state_dict()}, tmp_path / 'c.pth')
    model = tiny_vit(img_size=24)
    sd = convert_checkpoint(str(tmp_path / 'c.pth'), model)
    assert sd['pos_embed'].shape == (1, 37, 24)
    load_weights(model, sd)


@pytest.mark.parametrize('pretrain_keys', [False, True])
def test_mae_finetuned_checkpoint(tmp_path, pretrain_keys):
    # MAE's fine-tuned ViT: global average pooling over the non-class tokens, then fc_norm (no final norm)
    source = _randomised(tiny_vit(global_pool='avg'))
    sd = dict(source.state_dict())
    assert 'fc_norm.weight' in sd and not any(k.startswith('norm.') for k in sd)
    if pretrain_keys:
        sd.update({'mask_token': torch.zeros(1, 1, 24), 'decoder_embed.weight': torch.zeros(16, 24)})
    torch.save({'model': sd}, tmp_path / 'mae_finetuned_vit_tiny.pth')
    model = tiny_vit(global_pool='avg').eval()
    load_weights(model, convert_checkpoint(str(tmp_path / 'mae_finetuned_vit_tiny.pth'), model))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)
        mae_logits = model.head(model.fc_norm(tokens[:, 1:].mean(dim=1)))  # MAE's forward_features + head
        assert torch.allclose(model(x), mae_logits, atol=1e-6)
        assert torch.equal(model(x), source(x))


def test_conversion_errors(tmp_path):
    np.savez(tmp_path / 'x.npz', foo=np.zeros(2))
    with pytest.raises(CheckpointError, match="no 'embedding/kernel'"):
        convert_checkpoint(str(tmp_path / 'x.npz'), tiny_vit())
    (tmp_path / 'bad.npz').write_bytes(b'PK\x03\x04garbage')
    with pytest.raises(CheckpointError, match='bad.npz'):
        convert_checkpoint(str(tmp_path / 'bad.npz'), tiny_vit())
    torch.save({'epoch': 3}, tmp_path / 'e.pth')
    with pytest.raises(CheckpointError, match='no tensors'):
        convert_checkpoint(str(tmp_path / 'e.pth'), tiny_vit())


def test_convert_cli(tmp_path, capsys):
    from tools.convert import main
    source = _randomised(timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=4))
    _export_google_npz(source, str(tmp_path / 'ViT-Ti.npz'))
    argv = [str(tmp_path / 'ViT-Ti.npz'), str(tmp_path / 'out.pth'), '--model', 'vit_tiny_patch16_224',
            '--img-size', '32', '--num-classes', '4']
    assert main(argv) == 0
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=4).eval()
    load_weights(model, safe_load(tmp_path / 'out.pth')['model'])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - source(x)).abs().max() < 1e-5
    # a checkpoint of another model: exit status 1, the message names the mismatched keys, nothing written
    argv[1], argv[3] = str(tmp_path / 'bad.pth'), 'vit_small_patch16_224'
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert 'shape mismatch' in err and 'patch_embed.proj.weight' in err
    assert not (tmp_path / 'bad.pth').exists()


def test_load_finetune_drops_other_head_resizes_grid_and_refuses_other_models(tmp_path):
    import timm
    from shared.checkpoint import CheckpointError, load_finetune
    src = timm.create_model('vit_tiny_patch16_224', depth=2, num_classes=1000, img_size=64)
    path = tmp_path / 'deit.pth'
    torch.save({'model': src.state_dict()}, path)
    dst = timm.create_model('vit_tiny_patch16_224', depth=2, num_classes=7, img_size=96)
    head_before = dst.head.weight.clone()
    load_finetune(dst, str(path))
    assert torch.equal(dst.head.weight, head_before)  # 1000-class head dropped, 7-class head kept
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert dst.pos_embed.shape == (1, 1 + 36, 192)
    other = timm.create_model('vit_small_patch16_224', depth=2, num_classes=7, img_size=64)
    with pytest.raises(CheckpointError, match='shape mismatch'):
        load_finetune(other, str(path))
    shallower = tmp_path / 'shallow.pth'
    torch.save({'model': {k: v for k, v in src.state_dict().items() if not k.startswith('blocks.1.')}}, shallower)
    with pytest.raises(CheckpointError, match='lacks 12 weights of the model: blocks.1.'):
        load_finetune(dst, str(shallower))
    with pytest.raises(CheckpointError, match='checkpoint not found'):
        load_finetune(dst, str(tmp_path / 'none.pth'))
