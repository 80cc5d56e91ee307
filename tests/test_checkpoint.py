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
