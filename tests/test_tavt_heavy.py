"""The README's three commands under `torchrun --nproc_per_node=2` on CPU: a generated CUB_200_2011 folder, a tiny
12-layer ViT, only paths, steps, batch sizes and image size changed."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--model_type', 'tiny-test', '--pretrained_dir', 'w.npz', '--data_root', 'data', '--img_size', '64',
         '--train_batch_size', '2', '--num_workers', '0', '--warmup_steps', '1']


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, args):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
           os.path.join(REPO, 'tavt', 'train.py')] + args
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.heavy
def test_readme_commands_torchrun(tmp_path):
    from tavt.evolution import DUMMY_BATCH, read_population
    from tavt_helpers import write_cub, write_random_npz
    write_random_npz(str(tmp_path / 'w.npz'), grid=2)
    write_cub(str(tmp_path / 'data'), classes=4, per_class=8)
    # 4. baseline
    _torchrun(tmp_path, ['--dataset', 'CUB_200_2011', '--num_steps', '4', '--eval_every', '2', '--fp16',
                         '--name', 'CUB_VIT_baseline', '--max_seq_length', '17'] + SMALL)
    assert (tmp_path / 'output' / 'CUB_VIT_baseline_checkpoint.bin').is_file()
    # 5. distillation with patch drop (validation starts after the first epoch: 4 steps per epoch here)
    _torchrun(tmp_path, ['--dataset', 'CUB_200_2011', '--num_steps', '8', '--eval_every', '2', '--fp16',
                         '--name', 'CUB_VIT_adaptive', '--pretrained_model',
                         './output/CUB_VIT_baseline_checkpoint.bin', '--do_distil', '--max_seq_length', '17'] + SMALL)
    assert (tmp_path / 'output' / 'CUB_VIT_adaptive_checkpoint.bin').is_file()
    # 6. search
    log = _torchrun(tmp_path, ['--dataset', 'CUB_200_2011', '--fp16', '--name', 'CUB_VIT_adaptive', '--do_search',
                               '--max_seq_length', '17', '--pretrained_model',
                               './output/CUB_VIT_adaptive_checkpoint.bin', '--eval_batch_size', '4',
                               '--evo_iter', '2', '--population_size', '4', '--mutation_size', '3',
                               '--crossover_size', '3'] + SMALL)
    assert 'Start Iteration 2' in log
    frontier = read_population(str(tmp_path / 'evo' / 'CUB_VIT_adaptive' / 'population-iter2.tsv'))
    assert frontier[-1][0] == (17,) * 12
    for gene, macs, _ in frontier:
        out = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'flops.py'), '--method', 'tavt',
                              '--model_type', 'tiny-test', '--img_size', '64', '--config', ','.join(map(str, gene))],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
        gflops = float(out.stdout.strip().splitlines()[-1].split('=')[1])
        assert abs(macs / DUMMY_BATCH / 1e9 - gflops) < 1e-3 + 1e-9
