"""A-ViT entry script: flags, gate resolution, weights loading, training/eval/demo end to end on a generated
ImageNet-layout folder, and the measure hooks. Heavy: the README's commands under torchrun with 2 processes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from avit import main_act
from shared.checkpoint import load_finetune
from shared.errors import UserError
from avit.models_act import avit_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

README_TINY = ('--model avit_tiny_patch16_224 --pretrained --batch-size 128 --lr 0.0005 --tensorboard --epochs 100 '
               '--gate_scale 10.0 --gate_center 30 --warmup-epochs 5 --ponder_token_scale 0.0005 '
               '--distr_prior_alpha 0.001').split()
README_SMALL = ('--model avit_small_patch16_224 --pretrained --batch-size 96 --lr 0.0003 --tensorboard --epochs 100 '
                '--gate_scale 10.0 --gate_center 75 --warmup-epochs 5 --ponder_token_scale 0.0005 '
                '--distr_prior_alpha 0.001').split()

TRAIN_TAGS = {'train/lr', 'train/loss', 'train/cnt_token_mean', 'train/cnt_token_max', 'train/cnt_token_min',
              'train/avg_cnt_token_diff', 'train/ponder_loss_token', 'train/expected_depth_ratio',
              'train/distr_prior_loss'}
TEST_TAGS = {'test/acc_top1', 'test/acc_top5', 'test/loss', 'test/cnt_token_mean', 'test/cnt_token_max',
             'test/cnt_token_min', 'test/avg_cnt_token_diff', 'test/expected_depth_ratio'}
CHECKPOINT_KEYS = {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args'}
LOG_KEYS = {'train_lr', 'train_loss', 'train_cnt_token_mean', 'train_cnt_token_max', 'train_cnt_token_min',
            'train_cnt_token_diff', 'train_ponder_loss_token', 'train_remaining_compute', 'train_distri_prior_loss',
            'test_loss', 'test_acc1', 'test_acc5', 'epoch', 'n_parameters'}


def make_imagenet(root, classes=2, train=4, val=2, size=(40, 48)):
    rng = np.random.default_rng(0)
    for split, n in (('train', train), ('val', val)):
        for c in range(classes):
            folder = os.path.join(root, split, f'n{c:08d}')
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f'img{i}.JPEG'))
    return str(root)


def scalar_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()['scalars'])


def test_parser_defaults_are_the_originals():
    args = main_act.get_args_parser().parse_args([])
    assert (args.model, args.gate_scale, args.gate_center, args.ponder_token_scale, args.distr_prior_alpha,
            args.act_mode, args.epochs, args.batch_size, args.color_jitter) == \
        ('avit_tiny_patch16_224', 100., 3., 0.001, 0.01, 4, 300, 64, 0.4)
    assert args.pretrained is False and args.model_ema and args.repeated_aug and not args.tensorboard
    args = main_act.get_args_parser().parse_args(README_TINY)
    assert args.pretrained is True and args.gate_center == 30. and args.batch_size == 128
    args = main_act.get_args_parser().parse_args(['--pretrained', 'deit.pth'])
    assert args.pretrained == 'deit.pth'


@pytest.mark.parametrize('name, gates', [('a-vit-weights/tiny-10-30.pth', (10., 30.)),
                                         ('small-10-75.pth', (10., 75.)), ('tiny-10.0-30.0.pth', (10., 30.)),
                                         ('out/checkpoint.pth', None), ('visualization-tiny.pth', None)])
def test_gates_from_file_name(name, gates):
    assert main_act.gates_from_file_name(name) == gates


def test_gate_flags_win_over_file_name(tmp_path):
    ckpt = tmp_path / 'tiny-10-30.pth'
    ckpt.write_bytes(b'')
    args = main_act.parse(['--finetune', str(ckpt), '--gate_center', '40'])
    assert (args.gate_scale, args.gate_center) == (10., 40.)
    args = main_act.parse(['--finetune', str(ckpt)])
    assert (args.gate_scale, args.gate_center) == (10., 30.)
    other = tmp_path / 'checkpoint.pth'
    other.write_bytes(b'')
    args = main_act.parse(['--finetune', str(other), '--gate_scale', '10', '--gate_center', '30'])
    assert (args.gate_scale, args.gate_center) == (10., 30.)


@pytest.mark.parametrize('argv, message', [
    (['--act_mode', '1'], 'act_mode'), (['--distillation-type', 'hard'], 'distillation'),
    (['--finetune', '/nonexistent/tiny-10-30.pth'], 'not found'), (['--demo'], '--finetune')])
def test_bad_input_stops_with_a_message(argv, message):
    with pytest.raises((SystemExit, UserError), match=message):
        main_act.parse(argv)


def test_finetune_refuses_a_checkpoint_of_another_model(tmp_path):
    small = avit_models['avit_small_patch16_224'](num_classes=10, img_size=32)
    path = tmp_path / 'small-10-75.pth'
    torch.save({'model': small.state_dict()}, path)
    tiny = avit_models['avit_tiny_patch16_224'](num_classes=10, img_size=32)
    with pytest.raises(main_act.CheckpointError, match='shape mismatch'):
        load_finetune(tiny, str(path), '--finetune')


def test_deit_checkpoint_loads_with_head_and_pos_embed_adapted(tmp_path):
    deit = timm.create_model('vit_tiny_patch16_224', pretrained=False)  # DeiT-T layout, 1000 classes, 224
    path = tmp_path / 'deit_tiny_patch16_224-a1311bcf.pth'
    torch.save({'model': deit.state_dict()}, path)
    model = avit_models['avit_tiny_patch16_224'](num_classes=10, img_size=64)
    result = load_finetune(model, str(path), '--pretrained')
    assert set(result.missing_keys) == {'head.weight', 'head.bias'}
    assert torch.equal(model.blocks[3].mlp.fc1.weight, deit.blocks[3].mlp.fc1.weight)
    assert model.pos_embed.shape == (1, 17, 192)


def test_train_eval_demo_single_process(tmp_path, monkeypatch):
    data = make_imagenet(tmp_path / 'imagenet')
    out = tmp_path / 'out'
    monkeypatch.chdir(tmp_path)
    common = ['--data-path', data, '--num_workers', '0', '--input-size', '48', '--batch-size', '2', '--device', 'cpu']
    main_act.main(main_act.parse(['--model', 'avit_tiny_patch16_224', '--output_dir', str(out), '--epochs', '1',
                                  '--tensorboard', '--print-freq', '1', '--gate_scale', '10', '--gate_center', '30',
                                  '--ponder_token_scale', '0.0005', '--distr_prior_alpha', '0.001'] + common))
    lines = (out / 'log.txt').read_text().splitlines()
    assert len(lines) == 1 and set(json.loads(lines[0])) == LOG_KEYS
    checkpoint = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert CHECKPOINT_KEYS <= set(checkpoint)
    assert scalar_tags(out) >= TRAIN_TAGS | TEST_TAGS

    # Evaluating the checkpoint training wrote: the original crashed parsing 'checkpoint.pth'.
    for extra in ([], ['--zip-tokens']):
        main_act.main(main_act.parse(['--eval', '--finetune', str(out / 'checkpoint.pth'), '--gate_scale', '10',
                                      '--gate_center', '30'] + extra + common))

    demo = tmp_path / 'token_act_visualization'
    main_act.main(main_act.parse(['--demo', '--finetune', str(out / 'checkpoint.pth'), '--model',
                                  'avit_tiny_patch16_224'] + common))
    names = sorted(os.listdir(demo))
    # 4 val images of 2 classes in one batch of 50: one class (the first batch's) gets the three pictures.
    assert len(names) == 3 and {n.split('_', 1)[1] for n in names} == {'ref.jpg', 'token_depth.jpg',
                                                                     'combined.jpg'}
    combined = Image.open(demo / [n for n in names if n.endswith('combined.jpg')][0])
    assert combined.height == 367


def test_eval_prints_depth_and_gflops(tmp_path, capsys):
    data = make_imagenet(tmp_path / 'imagenet', classes=2, train=1, val=2)
    model = avit_models['avit_tiny_patch16_224'](num_classes=1000)
    path = tmp_path / 'tiny-10-30.pth'
    torch.save({'model': model.state_dict()}, path)
    main_act.main(main_act.parse(['--eval', '--finetune', str(path), '--data-path', data, '--num_workers', '0',
                                  '--batch-size', '4', '--device', 'cpu']))
    out = capsys.readouterr().out
    assert '* Mean depth 12.000 / 12' in out and 'GFLOPs 1.254 averaged over 4 images' in out


def test_flops_hook(tmp_path):
    from avit import measure
    import argparse
    parser = argparse.ArgumentParser()
    measure.add_flops_args(parser)
    assert abs(measure.flops(parser.parse_args(['--model', 'avit_small_patch16_224', '--full-depth'])) - 4.599) < 1e-3
    data = make_imagenet(tmp_path / 'imagenet', classes=2, train=1, val=2)
    full = measure.flops(parser.parse_args(['--data-path', data, '--gate_center', '1e4']))
    assert abs(full - 1.254) < 1e-3
    reduced = measure.flops(parser.parse_args(['--data-path', data, '--gate_scale', '100', '--gate_center', '3']))
    assert 0.2 < reduced < full


def test_benchmark_hook_rows():
    from avit import measure
    from avit.engine_act import per_image_macs
    from shared.flops import model_macs
    import argparse
    parser = argparse.ArgumentParser()
    measure.add_benchmark_args(parser)
    args = parser.parse_args(['--input-size', '64', '--batch-sizes', '1', '3', '--rounds', '1', '--runs', '1',
                              '--warmup', '0'])
    results = measure.benchmark(args)
    assert [row['batch_size'] for row in results['rows']] == [1, 3]
    deit = timm.create_model('vit_tiny_patch16_224', img_size=64)
    assert results['full_gflops'] == pytest.approx(model_macs(deit) / 1e9)  # 16 patches + class token
    model = measure._build(args, (100., 3.))
    for row in results['rows']:
        x = torch.randn(row['batch_size'], 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(x)
        gflops = float(per_image_macs(model, model.counter_token).mean()) / 1e9
        assert row['gflops'] == pytest.approx(gflops) and row['mean_depth'] < 12
        assert row['flops_reduction'] == pytest.approx(results['full_gflops'] / gflops)
        assert row['speedup'] == pytest.approx(row['zipped_img_s'] / row['deit_img_s'])
        assert row['tokens_per_block'] == [int((model.counter_token > i).sum(1).max()) for i in range(12)]
        assert row['tokens_per_block'][0] == 17 and row['tokens_per_block'][-1] < 17
        assert min(row[k] for k in ('deit_img_s', 'masked_img_s', 'zipped_img_s', 'zipped_no_halting_img_s',
                                    'blocks_only_img_s')) > 0


# ---------------------------------------------------------------------------------------------------------------
# Heavy: the README's commands under torchrun (2 processes, CPU)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def _torchrun(args, cwd, env):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port', _free_port(),
           os.path.join(REPO, 'avit', 'main_act.py')] + args
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.heavy
@pytest.mark.parametrize('readme, deit_name, timm_name', [
    (README_TINY, 'deit_tiny_patch16_224-a1311bcf.pth', 'vit_tiny_patch16_224'),
    (README_SMALL, 'deit_small_patch16_224-cd65a155.pth', 'vit_small_patch16_224')])
def test_readme_commands_torchrun(tmp_path, readme, deit_name, timm_name):
    data = make_imagenet(tmp_path / 'imagenet', classes=2, train=4, val=2)
    # `--pretrained` reads the DeiT start point from torch.hub's checkpoint folder: a random-weight one here.
    torch_home = tmp_path / 'torch_home'
    (torch_home / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.save({'model': timm.create_model(timm_name, pretrained=False).state_dict()},
               torch_home / 'hub' / 'checkpoints' / deit_name)
    env = dict(os.environ, TORCH_HOME=str(torch_home), OMP_NUM_THREADS='1')
    out = tmp_path / 'results' / 'exp'
    train = list(readme)
    # Only data path, output dir, batch size, epochs and (via the generated folder) image count changed; the
    # input is reduced to 64 px to keep two CPU processes fast.
    train[train.index('--batch-size') + 1] = '2'
    train[train.index('--epochs') + 1] = '1'
    train += ['--data-path', data, '--output_dir', str(out), '--input-size', '64']
    stdout = _torchrun(train, tmp_path, env)
    assert 'Max accuracy' in stdout and '* Mean depth' in stdout
    lines = (out / 'log.txt').read_text().splitlines()
    assert len(lines) == 1 and set(json.loads(lines[0])) == LOG_KEYS
    assert CHECKPOINT_KEYS <= set(torch.load(out / 'checkpoint.pth', weights_only=False))
    assert scalar_tags(out) >= TEST_TAGS

    # README eval: the training command + `--eval --finetune <ckpt>` (the original needs a gate-named file).
    named = tmp_path / ('tiny-10-30.pth' if 'tiny' in deit_name else 'small-10-75.pth')
    named.write_bytes((out / 'checkpoint.pth').read_bytes())
    stdout = _torchrun(train + ['--eval', '--finetune', str(named)], tmp_path, env)
    assert 'Accuracy of the network on the 4 test images' in stdout

    # README demo (the model comes from the checkpoint's name).
    stdout = _torchrun(['--data-path', data, '--finetune', str(named), '--demo', '--input-size', '64'], tmp_path, env)
    assert 'Visualization done.' in stdout
    names = os.listdir(tmp_path / 'token_act_visualization')
    assert len(names) == 3 and all(n.endswith('.jpg') for n in names)
