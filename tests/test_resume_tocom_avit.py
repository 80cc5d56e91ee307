"""ToCom (pre-training and fine-tuning) and A-ViT on shared.trainer: a run stopped after 2 epochs and rerun with
--epochs 3 into the same folder ends exactly where a straight 3-epoch run ends (model, optimizer state, EMA, log.txt),
and a rerun with auto-resume switched off refuses a folder that holds a checkpoint without touching it.

The runs use the step schedule (first decay at epoch 30), whose lr does not depend on --epochs: a cosine schedule's
horizon is --epochs, so raising --epochs changes the lr of the later epochs, a different training, not a resume
fault. RandAugment, mixup/cutmix and random erasing stay on (DeiT's defaults), and ToCom's pre-training draws its
(r_tgt, r_src) pairs from its own random.Random: every one of these streams has to continue where it stopped."""
import json
import os

import pytest
import torch

from shared.checkpoint import safe_load
from shared.errors import UserError

FAKE = ['--data-set', 'FAKE', '--fake-size', '8', '--fake-classes', '4', '--input-size', '32', '--device', 'cpu',
        '--num_workers', '0', '--batch-size', '4', '--print-freq', '100', '--sched', 'step']


def tocom_pretrain(deit):
    return ['--model', 'deit_tiny_patch16_224_tocom', '--finetune', deit, '--warmup-epochs', '0',
            '--distillation-type', 'soft', '--distillation-alpha', '1.0', '--teacher-model', 'deit_tiny_patch16_224',
            '--teacher-path', deit, '--lr', '1e-3', '--r_src', '-1']


def tocom_finetune(deit):
    return ['--model', 'deit_tiny_patch16_224', '--finetune', deit, '--warmup-epochs', '1', '--lr', '5e-4',
            '--r_src', '2']


AVIT = ['--model', 'avit_tiny_patch16_224', '--warmup-epochs', '1', '--gate_scale', '10', '--gate_center', '30',
        '--model-ema']


def run_tocom(argv):
    from tocom.main import get_args_parser, main
    return main(get_args_parser().parse_args([str(a) for a in [*argv, *FAKE]]))


def run_avit(argv):
    from avit import main_act
    return main_act.main(main_act.parse([str(a) for a in [*argv, *FAKE]]))


@pytest.fixture
def deit(tmp_path):
    """A random DeiT-Ti (4 classes, 32 px): the --finetune start point and the pre-training teacher."""
    from tocom.models import MODELS
    torch.manual_seed(0)
    path = tmp_path / 'deit_tiny.pth'
    torch.save({'model': MODELS['deit_tiny_patch16_224'](num_classes=4, img_size=32).state_dict()}, path)
    return path


@pytest.fixture(autouse=True)
def fresh_random_streams(monkeypatch):
    # a stream another test registered would be saved into (and restored from) these runs' checkpoints
    import shared.checkpoint
    monkeypatch.setattr(shared.checkpoint, '_RANDOM_STREAMS', {})


CASES = {
    'tocom_pretrain': (run_tocom, tocom_pretrain),
    'tocom_finetune': (run_tocom, tocom_finetune),
    'avit': (run_avit, lambda deit: AVIT),
}


def assert_tensors_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for name in a:
        assert torch.equal(a[name], b[name]), (what, name)


def assert_same_end(straight, split):
    a, b = safe_load(straight / 'checkpoint.pth'), safe_load(split / 'checkpoint.pth')
    assert a['epoch'] == b['epoch'] == 2
    assert_tensors_equal(a['model'], b['model'], 'model')
    assert (a.get('model_ema') is None) == (b.get('model_ema') is None)
    if a.get('model_ema') is not None:
        assert_tensors_equal(a['model_ema'], b['model_ema'], 'model_ema')
    state_a, state_b = a['optimizer']['state'], b['optimizer']['state']
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for i in state_a:
        assert_tensors_equal({k: torch.as_tensor(v) for k, v in state_a[i].items()},
                             {k: torch.as_tensor(v) for k, v in state_b[i].items()}, f'optimizer state {i}')
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    assert a['lr_scheduler'] == b['lr_scheduler']
    text = (straight / 'log.txt').read_text()
    assert [json.loads(line)['epoch'] for line in text.splitlines()] == [0, 1, 2]
    assert (split / 'log.txt').read_text() == text
    return a, text


def folder_bytes(out):
    """Every file of a run folder but the lock file (each start rewrites its holder line), with its bytes."""
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out)) if name != '.run.lock'}


@pytest.mark.parametrize('case', list(CASES))
def test_rerun_with_more_epochs_equals_a_straight_run(case, deit, tmp_path, capsys):
    run, flags = CASES[case]
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    run([*flags(deit), '--epochs', '3', '--output_dir', straight])
    run([*flags(deit), '--epochs', '2', '--output_dir', split])
    capsys.readouterr()
    run([*flags(deit), '--epochs', '3', '--output_dir', split])
    printed = capsys.readouterr().out
    assert 'resumed from' in printed and 'starting epoch 2' in printed
    assert 'Epoch: [2]' in printed and 'Epoch: [1]' not in printed

    checkpoint, text = assert_same_end(straight, split)
    entries = [json.loads(line) for line in text.splitlines()]
    if case == 'tocom_pretrain':
        # 'model' holds only the compensator; no evaluation, so no best file and no test entries in the log
        assert len(checkpoint['model']) == 48 and all('_tocom.' in k for k in checkpoint['model'])
        assert 'streams' in checkpoint['rng'][0] and 'tocom_pairs' in checkpoint['rng'][0]['streams']
        assert not (split / 'best_checkpoint.pth').exists()
        assert all('train_r_tgt' in e and not any(k.startswith('test_') for k in e) for e in entries)
    else:
        accuracies = [e['test_acc1'] for e in entries]
        # best_checkpoint.pth is written when the accuracy beats the best so far (which starts at 0)
        best_epoch = accuracies.index(max(accuracies)) if max(accuracies) > 0 else None
        assert (split / 'best_checkpoint.pth').exists() == (best_epoch is not None)
        if best_epoch is None:
            return
        best = safe_load(split / 'best_checkpoint.pth')
        if case == 'tocom_finetune':
            # the whole model's state dict (checkpoint.pth's 'model' keeps only the trainable weights)
            assert set(best) == {'model'} and set(checkpoint['model']) <= set(best['model'])
        else:
            assert best['epoch'] == best_epoch and best['model'].keys() == checkpoint['model'].keys()


@pytest.mark.parametrize('case', list(CASES))
def test_auto_resume_off_refuses_a_folder_holding_a_checkpoint(case, deit, tmp_path):
    run, flags = CASES[case]
    out = tmp_path / 'run'
    run([*flags(deit), '--epochs', '1', '--output_dir', out])
    before = folder_bytes(out)
    assert 'checkpoint.pth' in before and 'log.txt' in before
    with pytest.raises(UserError, match=f'{out / "checkpoint.pth"} holds an earlier run and auto-resume is off'):
        run([*flags(deit), '--epochs', '2', '--no-auto-resume', '--output_dir', out])
    assert folder_bytes(out) == before


def test_resume_flags_parse():
    from avit import main_act
    from tocom.main import get_args_parser
    for parser in (get_args_parser(), main_act.get_args_parser()):
        assert parser.parse_args([]).auto_resume  # on by default
        assert parser.parse_args(['--auto-resume']).auto_resume
        assert not parser.parse_args(['--no-auto-resume']).auto_resume
        assert parser.parse_args(['--resume', 'x.pth']).resume == 'x.pth'
