"""The ToCom README's commands end to end on generated data in the real layouts (ImageNet folders, CIFAR-100 pickles),
with only data path, output dir, batch size, epochs and model size changed (DeiT-Ti at 64 px)."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import torchrun
from shared.checkpoint import CheckpointError, safe_load
from shared.datasets import DatasetLayoutError
from shared.errors import UserError
from tocom.main import get_args_parser, main
from tocom.models import MODELS

COMMON = ['--input-size', '64', '--device', 'cpu', '--num_workers', '0', '--batch-size', '2']


def make_data(root):
    rng = np.random.default_rng(0)
    for split, n in (('train', 2), ('val', 1)):
        for wnid in ('n01440764', 'n01443537'):
            folder = root / 'imnet' / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f'{i}.JPEG')
    cifar = root / 'cifar' / 'cifar-100-python'
    cifar.mkdir(parents=True)
    for name, n in (('train', 4), ('test', 3)):
        with open(cifar / name, 'wb') as f:
            pickle.dump({'data': rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         'fine_labels': [int(v) for v in rng.integers(0, 100, n)], 'coarse_labels': [0] * n,
                         'filenames': [f'{i}.png' for i in range(n)]}, f)
    with open(cifar / 'meta', 'wb') as f:
        pickle.dump({'fine_label_names': [str(i) for i in range(100)]}, f)
    torch.manual_seed(0)
    deit = MODELS['deit_tiny_patch16_224'](num_classes=1000, img_size=64)
    torch.save({'model': deit.state_dict()}, root / 'deit_tiny.pth')


def pretrain_args(root, out):
    return ['--model', 'deit_tiny_patch16_224_tocom', '--data-path', root / 'imnet', '--output_dir', out,
            '--epochs', '1', '--finetune', root / 'deit_tiny.pth', '--warmup-epochs', '0',
            '--distillation-type', 'soft', '--distillation-alpha', '1.0', '--teacher-model', 'deit_tiny_patch16_224',
            '--teacher-path', root / 'deit_tiny.pth', '--lr', '1e-3', '--r_src', '-1']


def finetune_args(root, out):
    return ['--model', 'deit_tiny_patch16_224', '--data-path', root / 'cifar', '--output_dir', out,
            '--epochs', '1', '--data-set', 'CIFAR', '--finetune', root / 'deit_tiny.pth', '--warmup-epochs', '10',
            '--lr', '5e-5', '--r_src', '4']


def eval_args(root, downstream, tocom, r_tgt=8):
    return ['--model', 'deit_tiny_patch16_224_tocom', '--data-path', root / 'cifar', '--data-set', 'CIFAR',
            '--finetune', downstream, '--eval', '--r_src', '4', '--r_tgt', str(r_tgt), '--tocom_scale', '0.1',
            '--tocom_path', tocom]


def run_main(argv):
    return main(get_args_parser().parse_args([str(a) for a in [*argv, *COMMON]]))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Pre-training, downstream fine-tuning and evaluation, once for the module (their output is checked below)."""
    import contextlib
    import io
    root = tmp_path_factory.mktemp('tocom')
    make_data(root)
    logs = {}
    for name, argv in (('pre', pretrain_args(root, root / 'pre')), ('cifar', finetune_args(root, root / 'CIFAR')),
                       ('eval', eval_args(root, root / 'CIFAR' / 'checkpoint.pth', root / 'pre' / 'checkpoint.pth'))):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            result = run_main(argv)
        logs[name] = (buf.getvalue(), result)
    return root, logs


def test_pretraining_writes_compensator_only(runs):
    root, logs = runs
    out, _ = logs['pre']
    assert 'Creating teacher model: deit_tiny_patch16_224' in out
    assert 'number of params: 294912' in out  # 12 blocks x {q, v} x (32x192 + 192x32)
    assert 'Epoch: [0]' in out and 'Training time' in out
    assert 'Accuracy of the network' not in out  # no evaluation in pre-training
    # no evaluation, so no best_checkpoint.pth; log.txt holds the training statistics of each epoch
    assert sorted(n for n in os.listdir(root / 'pre') if not n.startswith('.')) == ['checkpoint.pth', 'log.txt']
    lines = (root / 'pre' / 'log.txt').read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry['epoch'] == 0 and entry['n_parameters'] == 294912
    assert {'train_lr', 'train_loss', 'train_r_tgt', 'train_r_src'} <= set(entry)
    assert not [k for k in entry if k.startswith('test_')]
    ckpt = safe_load(root / 'pre' / 'checkpoint.pth')  # it holds the run's args too
    keys = set(ckpt['model'])
    assert len(keys) == 48 and all('.q_tocom.' in k or '.v_tocom.' in k for k in keys)
    assert ckpt['model']['blocks.0.attn.q_tocom.adapter_down.weight'].shape == (32, 192)
    # the up-projections moved away from their zero initialisation: the compensator trained
    assert any(torch.count_nonzero(v) for k, v in ckpt['model'].items() if 'adapter_up' in k)


def test_finetune_writes_full_model_and_log(runs):
    root, logs = runs
    out, stats = logs['cifar']
    assert 'Accuracy of the network on the 3 test images:' in out and 'Max accuracy:' in out
    assert '* Acc@1' in out and 'Removing key head.weight from pretrained checkpoint' in out
    ckpt = safe_load(root / 'CIFAR' / 'checkpoint.pth')
    assert ckpt['model']['head.weight'].shape == (100, 192)  # head re-initialised for CIFAR-100's classes
    line = json.loads((root / 'CIFAR' / 'log.txt').read_text().splitlines()[-1])
    assert {'train_lr', 'train_loss', 'test_loss', 'test_acc1', 'test_acc5', 'epoch', 'n_parameters'} <= set(line)


def test_evaluation_prints_accuracy(runs):
    root, logs = runs
    out, stats = logs['eval']
    assert 'Accuracy of the network on the 3 test images:' in out
    assert 0.0 <= stats['acc1'] <= 100.0


def test_evaluation_fold_matches_unfolded(runs):
    root, _ = runs
    args = eval_args(root, root / 'CIFAR' / 'checkpoint.pth', root / 'pre' / 'checkpoint.pth', r_tgt=12)
    folded = run_main(args)
    unfolded = run_main([*args, '--no-tocom_fold'])
    assert abs(folded['loss'] - unfolded['loss']) < 1e-4


def test_bad_inputs(runs, tmp_path):
    root, _ = runs
    with pytest.raises((SystemExit, UserError), match='--r_tgt 17'):
        run_main(eval_args(root, root / 'CIFAR' / 'checkpoint.pth', root / 'pre' / 'checkpoint.pth', r_tgt=17))
    with pytest.raises((SystemExit, UserError), match='--r_src'):
        run_main([*finetune_args(root, tmp_path / 'x')[:-1], '20'])
    with pytest.raises((SystemExit, UserError), match='teacher'):
        run_main(pretrain_args(root, tmp_path / 'y')[:10] + ['--r_src', '-1'])
    # a compensator trained for another width (DeiT-S's 384 into DeiT-Ti's 192)
    small = MODELS['deit_small_patch16_224_tocom'](num_classes=10, img_size=64)
    torch.save({'model': {n: p for n, p in small.named_parameters() if p.requires_grad}}, tmp_path / 'small.pth')
    with pytest.raises(CheckpointError, match='width 384'):
        run_main(eval_args(root, root / 'CIFAR' / 'checkpoint.pth', tmp_path / 'small.pth'))
    # a CUB folder without its split file
    cub = tmp_path / 'CUB_200_2011'
    (cub / 'images' / '001.A').mkdir(parents=True)
    (cub / 'images.txt').write_text('1 001.A/a.jpg\n')
    (cub / 'image_class_labels.txt').write_text('1 1\n')
    with pytest.raises(DatasetLayoutError, match='train_test_split'):
        run_main(['--model', 'deit_tiny_patch16_224', '--data-set', 'CUB', '--data-path', tmp_path, '--r_src', '2'])


@pytest.mark.heavy
def test_readme_commands_torchrun(tmp_path):
    make_data(tmp_path)
    common = [str(a) for a in COMMON]
    for argv in (pretrain_args(tmp_path, tmp_path / 'pre'), finetune_args(tmp_path, tmp_path / 'CIFAR'),
                 eval_args(tmp_path, tmp_path / 'CIFAR' / 'checkpoint.pth', tmp_path / 'pre' / 'checkpoint.pth')):
        proc = torchrun(['tocom/main.py', *map(str, argv), *common], nproc=2)
        assert proc.returncode == 0, proc.stdout[-3000:]
    assert 'Accuracy of the network on the 3 test images' in proc.stdout
    assert (tmp_path / 'pre' / 'checkpoint.pth').exists() and (tmp_path / 'CIFAR' / 'log.txt').exists()
