"""ToE in EfficientTrain: freq_crop, the curriculum commands, chunked training with pos-embed resize on resume."""
import json

import pytest
import torch

from tests.conftest import run_script
from toe.EfficientTrain import ET_training
from toe.EfficientTrain.main import cosine_scheduler, freq_crop, parse_args
from toe.token_select import TokenSelect


def test_freq_crop_low_passes():
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(freq_crop(x, 16), x, atol=1e-5)  # the full band is the identity
    const = torch.full((1, 3, 16, 16), 0.7)
    assert freq_crop(const, 8).shape == (1, 3, 8, 8) and torch.allclose(freq_crop(const, 8), const[..., :8, :8])


def test_curriculum_commands():
    args = ET_training.get_args_parser().parse_args(['--data_path', '/d', '--model', 'deit_small_patch16_224',
                                                     '--final_bs', '256', '--epochs', '300', '--num_gpus', '8'])
    cmds = [ET_training.chunk_command(args, i) for i in range(5)]
    flag = lambda c, f: c[c.index(f) + 1]  # noqa: E731
    assert [flag(c, '--input_size') for c in cmds] == ['160', '160', '160', '192', '224']
    assert [flag(c, '--end_epoch') for c in cmds] == ['60', '120', '180', '240', '300']
    assert [flag(c, '--batch_size') for c in cmds] == ['512'] * 4 + ['256']
    assert [flag(c, '--update_freq') for c in cmds] == ['1'] * 4 + ['2']
    assert [flag(c, '--aa') for c in cmds] == [f'rand-m{m}-mstd0.5-inc1' for m in (1, 3, 5, 7, 9)]
    assert flag(cmds[0], '--keep-rate') == '0.6' and flag(cmds[0], '--initialization-keep-rate') == '0.3'
    retry = ET_training.chunk_command(args, 0, retry=True)
    assert flag(retry, '--batch_size') == '256' and flag(retry, '--update_freq') == '2'
    # the ET DeiT schedule's token counts at the three chunk sizes (spec table)
    ts = TokenSelect([0, 100, 200], [0.6, 0.8, 1.0], 0.3, 2)
    assert [ts.stage_token_counts(n) for n in (196, 144, 100)] == [[116, 155, 196], [86, 114, 144], [60, 80, 100]]
    assert len(cosine_scheduler(4e-3, 1e-6, 3, 5, warmup_epochs=1)) == 15


@pytest.mark.parametrize('flags,msg', [
    (['--keep-rate', '0.8', '0.6', '1.0'], 'non-decreasing'), (['--expansion-step', '0', '100'], 'has 2 values'),
    (['--keep-rate', '0.6', '0.8', '1.1'], '<= 1.0'),
    (['--initialization-keep-rate', '0.7', '--keep-rate', '0.6', '0.8', '1.0'], 'above the first'),
    (['--model', 'convnext_tiny'], 'DeiT models')])
def test_bad_inputs(flags, msg, capsys):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert msg in capsys.readouterr().err


def test_two_chunks_resume_with_a_bigger_grid(tmp_path):
    out = tmp_path / 'et'
    common = ['toe/EfficientTrain/main.py', '--model', 'vit_digits_patch4_32', '--data_set', 'FAKE',
              '--base_input_size', '32', '--batch_size', '8', '--num_workers', '0', '--device', 'cpu',
              '--output_dir', out, '--epochs', '2', '--warmup_epochs', '0', '--aa', '', '--mixup', '0',
              '--cutmix', '0', '--expansion-step', '0', '1', '2', '--keep-rate', '0.6', '0.8', '1.0',
              '--initialization-keep-rate', '0.3', '--expansion-multiple-stage', '2']
    r = run_script([*common, '--end_epoch', '1', '--input_size', '24'], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert 'expansion stage 1/3, 20/36 patch tokens kept' in r.stdout  # 24 px / 4 = 6x6 grid, freq_crop'ed
    r = run_script([*common, '--end_epoch', '2', '--input_size', '32'], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert 'pos_embed 6x6 -> 8x8' in r.stdout and 'expansion stage 2/3, 50/64 patch tokens kept' in r.stdout
    log = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [(e['epoch'], e['input_size'], e['train_kept_tokens']) for e in log] == [(0, 24, 20), (1, 32, 50)]
    assert (out / 'checkpoint-1.pth').exists() and (out / 'checkpoint-best.pth').exists()


@pytest.mark.heavy
def test_et_run_script_torchrun_two_processes(tmp_path):
    """run/imagenet_small_run1.sh (ET_training.py, DeiT-S) on 2 processes and a generated ImageNet layout: paths, batch
    sizes (and accumulation), epochs (300 -> 5, expansion steps 0/100/200 -> 0/2/4) and image counts changed."""
    import numpy as np
    from PIL import Image
    data = tmp_path / 'imnet'
    rng = np.random.default_rng(0)
    for split, n in (('train', 4), ('val', 1)):
        for c in range(2):
            d = data / split / f'n0{c}'
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f'img_{i}.JPEG')
    out = tmp_path / 'result'
    r = run_script(['toe/EfficientTrain/ET_training.py', '--data_path', data, '--output_dir', out,
                    '--model', 'deit_small_patch16_224', '--final_bs', '2', '--epochs', '5', '--num_gpus', '2',
                    '--num_workers', '0', '--master_port', '0',
                    '--extra', '--update_freq 1 --expansion-step 0 2 4 --nb_classes 2'], timeout=3000)
    assert r.returncode == 0, r.stdout[-4000:]
    for line in ('expansion stage 1/3, 60/100', 'expansion stage 2/3, 80/100', 'expansion stage 2/3, 114/144',
                 'expansion stage 3/3, 196/196'):
        assert line in r.stdout
    log = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [e['input_size'] for e in log] == [160, 160, 160, 192, 224]
