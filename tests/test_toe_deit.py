"""ToE DeiT entry script: flags, bad schedules, a tiny run through the stages, resume across a stage boundary."""
import json

import pytest
import torch

from tests.conftest import run_script, torchrun
from toe.deit.main import get_args_parser, parse_args
from toe.deit.models import VisionTransformerExpansion, create_model
from toe.token_select import TokenSelect

RUN_SCRIPT_TOE = ['--expansion-step', '0', '100', '200', '--keep-rate', '0.5', '0.75', '1.0',
                  '--initialization-keep-rate', '0.25', '--expansion-multiple-stage', '2']


def test_list_flags_defaults_and_values():
    args = parse_args([])  # the original exits here (string defaults through int()/float())
    assert args.expansion_step == [0, 100, 200] and args.keep_rate == [0.5, 0.75, 1.0]
    assert args.initialization_keep_rate == 0.4 and args.expansion_multiple_stage == 5
    args = parse_args(['--patch-size', '16', '--model', 'deit_small_patch16_224', '--batch-size', '256',
                       '--num_workers', '8', '--seed', '3407', *RUN_SCRIPT_TOE])
    assert args.expansion_step == [0, 100, 200] and args.initialization_keep_rate == 0.25
    assert args.model_ema and args.repeated_aug and args.distance == 'cosine' and not args.sparse_eval


@pytest.mark.parametrize('flags,msg', [
    (['--keep-rate', '0.75', '0.5', '1.0'], 'non-decreasing'),
    (['--expansion-step', '0', '100'], 'has 2 values'),
    (['--keep-rate', '0.5', '0.75', '1.5'], '<= 1.0'),
    (['--initialization-keep-rate', '0.6', '--keep-rate', '0.5', '0.75', '1.0'], 'above the first'),
])
def test_bad_schedules_stop_before_training(flags, msg, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_model_selects_before_block_1():
    model = create_model('deit_tiny_patch16_224', num_classes=10, img_size=64, drop_path_rate=0.0)
    assert isinstance(model, VisionTransformerExpansion)
    model.token_select = TokenSelect([0, 1, 2], [0.5, 0.75, 1.0], 0.25, 2)
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[1]))
    model.blocks[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[1]))
    model.token_select.sparse_inference = True
    x = torch.randn(2, 3, 64, 64)
    for epoch, kept in [(0, 8), (1, 12), (2, 16)]:
        seen.clear()
        model.token_select.update_current_stage(epoch)
        assert model(x).shape == (2, 10)
        assert seen == [17, 1 + kept]  # block 0 sees everything, block 1 the kept tokens
    import timm
    assert type(timm.create_model('deit_tiny_patch16_224')) is not VisionTransformerExpansion  # timm untouched


TINY = ['--model', 'vit_digits_patch4_32', '--data-set', 'FAKE', '--fake-size', '16', '--fake-classes', '4',
        '--input-size', '32', '--batch-size', '8', '--num_workers', '0', '--device', 'cpu', '--aa', '',
        '--expansion-step', '0', '1', '2', '--keep-rate', '0.5', '0.75', '1.0', '--initialization-keep-rate', '0.25',
        '--expansion-multiple-stage', '2', '--warmup-epochs', '0']


def _log(out):
    return [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]


def test_stages_and_resume_across_a_stage_boundary(tmp_path):
    out = tmp_path / 'run'
    r = run_script(['toe/deit/main.py', *TINY, '--epochs', '2', '--output_dir', out], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert 'expansion stage 1/3, 32/64 patch tokens kept' in r.stdout
    assert 'expansion stage 2/3, 48/64 patch tokens kept' in r.stdout
    assert (out / 'checkpoint.pth').exists() and (out / 'best_checkpoint.pth').exists()
    # same command with more epochs: auto-resume from checkpoint.pth continues at epoch 2, the full-token stage
    r = run_script(['toe/deit/main.py', *TINY, '--epochs', '3', '--output_dir', out], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert 'starting epoch 2' in r.stdout and 'expansion stage 3/3, 64/64 patch tokens kept' in r.stdout
    assert 'expansion stage 1/3' not in r.stdout
    log = _log(out)
    assert [e['epoch'] for e in log] == [0, 1, 2]
    assert [e['train_kept_tokens'] for e in log] == [32, 48, 64]
    assert all(e['train_total_train_time'] > 0 and 'ema_test_acc1' in e for e in log)
    # with auto-resume switched off the folder is refused: one error line (run_cli), exit status 2, nothing touched
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != '.run.lock'}
    r = run_script(['toe/deit/main.py', *TINY, '--epochs', '4', '--no-auto-resume', '--output_dir', out], timeout=300)
    assert r.returncode == 2 and 'error: ' in r.stdout and 'auto-resume is off' in r.stdout, r.stdout[-3000:]
    assert 'Traceback' not in r.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != '.run.lock'} == before


@pytest.mark.heavy
def test_run_script_torchrun_two_processes(tmp_path):
    """imagenet_small_run1.sh with 2 processes on a generated ImageNet layout: paths, batch size, epochs (expansion
    steps scaled 0/100/200 of 300 -> 0/1/2 of 3) and image counts changed."""
    from PIL import Image
    import numpy as np
    data = tmp_path / 'imnet'
    rng = np.random.default_rng(0)
    for split, n in (('train', 8), ('val', 4)):
        for c in range(2):
            d = data / split / f'n0000000{c}'
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f'img_{i}.JPEG')
    out = tmp_path / 'result'
    args = ['toe/deit/main.py', '--patch-size', '16', '--model', 'deit_small_patch16_224', '--batch-size', '4',
            '--data-path', data, '--output_dir', out, '--num_workers', '0', '--seed', '3407',
            '--expansion-step', '0', '1', '2', '--keep-rate', '0.5', '0.75', '1.0', '--initialization-keep-rate',
            '0.25', '--expansion-multiple-stage', '2', '--epochs', '2']
    r = torchrun(args, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:]
    assert 'expansion stage 1/3, 98/196' in r.stdout and 'expansion stage 2/3, 147/196' in r.stdout
    assert args[-2:] == ['--epochs', '2']
    r = torchrun(args[:-1] + ['3'], timeout=1200)  # the same command for 3 epochs: resumes into stage 3
    assert r.returncode == 0, r.stdout[-4000:]
    assert 'expansion stage 3/3, 196/196' in r.stdout
    assert [e['train_kept_tokens'] for e in _log(out)] == [98, 147, 196]
