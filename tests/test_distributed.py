"""tools/train_baseline.py end to end: single-process resume exactness and bad inputs (fast), 2-process torchrun
training with identical parameters on both ranks, and a worker killed mid-epoch that torchrun restarts and that
resumes to the same parameters as an uninterrupted run (heavy)."""
import os
import subprocess
import sys

import pytest
import torch

from shared.checkpoint import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError, safe_load
from shared.datasets import DatasetLayoutError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few seconds per epoch on one CPU core: 32 generated 16-px images, batches of 4.
TINY = ['--data-set', 'FAKE', '--fake-size', '32', '--fake-classes', '4', '--input-size', '16', '--batch-size', '4',
        '--device', 'cpu', '--print-freq', '100']


def run_main(argv):
    from tools.train_baseline import get_args_parser, main
    args = get_args_parser().parse_args(argv)
    main(args)
    return args


def params_of(path):
    return safe_load(path)['model']


def assert_same(sd_a, sd_b):
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


# ------------------------------------------------------------------ single process (fast)


def test_single_process_run_logs_and_resumes_exactly(tmp_path):
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    run_main(TINY + ['--epochs', '2', '--output_dir', straight])
    lines = open(os.path.join(straight, 'log.txt')).read().splitlines()
    assert len(lines) == 2 and '"test_acc1"' in lines[0] and '"epoch": 1' in lines[1]
    ckpt = safe_load(os.path.join(straight, 'checkpoint.pth'))
    assert ckpt['epoch'] == 1 and ckpt['args'].epochs == 2 and len(ckpt['rng']) == 1
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(straight))

    run_main(TINY + ['--epochs', '1', '--output_dir', split])            # stops after epoch 0
    args = run_main(TINY + ['--epochs', '2', '--output_dir', split])     # same dir: auto-resumes at epoch 1
    assert args.resume == os.path.join(split, 'checkpoint.pth') and args.start_epoch == 1
    assert_same(params_of(os.path.join(straight, 'checkpoint.pth')), params_of(os.path.join(split, 'checkpoint.pth')))
    assert len(open(os.path.join(split, 'log.txt')).read().splitlines()) == 2


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_bad_inputs_stop_with_clear_messages(tmp_path):
    with pytest.raises(DatasetLayoutError, match='nope'):
        run_main(TINY + ['--data-set', 'IMNET', '--data-path', str(tmp_path / 'nope'), '--output_dir', ''])
    (tmp_path / 'imnet' / 'train' / 'n01').mkdir(parents=True)  # a class folder without images, no val/
    with pytest.raises(DatasetLayoutError):
        run_main(TINY + ['--data-set', 'IMNET', '--data-path', str(tmp_path / 'imnet'), '--output_dir', ''])

    good = str(tmp_path / 'good')
    run_main(TINY + ['--epochs', '1', '--output_dir', good])
    data = open(os.path.join(good, 'checkpoint.pth'), 'rb').read()
    (tmp_path / 'truncated.pth').write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match='truncated.pth'):
        run_main(TINY + ['--resume', str(tmp_path / 'truncated.pth'), '--output_dir', ''])

    import timm
    other = timm.create_model('vit_tiny_patch16_224', img_size=16, num_classes=4)
    torch.save({'model': other.state_dict(), 'epoch': 0}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointMismatchError, match=r'other.pth.*shape mismatch.*cls_token'):
        run_main(TINY + ['--resume', str(tmp_path / 'other.pth'), '--output_dir', ''])

    marker = tmp_path / 'payload-ran'
    torch.save({'model': _Payload(marker)}, tmp_path / 'evil.pth')
    for flag in ('--resume', '--finetune'):
        with pytest.raises(UnsafeCheckpointError, match='not unpickled'):
            run_main(TINY + [flag, str(tmp_path / 'evil.pth'), '--output_dir', ''])
    assert not marker.exists()


def test_cli_prints_error_without_traceback(tmp_path, monkeypatch, capsys):
    import runpy
    monkeypatch.setattr(sys, 'argv', ['train_baseline.py', '--data-set', 'CUB', '--data-path', str(tmp_path),
                                      '--output_dir', ''])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, 'tools', 'train_baseline.py'), run_name='__main__')
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'images.txt not found' in err


# ------------------------------------------------------------------ SLURM without torchrun (fast)


@pytest.mark.parametrize('hostlist, hosts', [
    ('a[1-3,5]', ['a1', 'a2', 'a3', 'a5']),
    ('a[01-04]', ['a01', 'a02', 'a03', 'a04']),
    ('a1,b[2-3]', ['a1', 'b2', 'b3']),
    ('rack1-n[001-002]', ['rack1-n001', 'rack1-n002']),
    ('node-a[1,3]', ['node-a1', 'node-a3']),
    ('host', ['host']),
    ('a[8-10]', ['a8', 'a9', 'a10']),
    ('x[1-2]y[7,9]', ['x1y7', 'x1y9', 'x2y7', 'x2y9']),
])
def test_expand_hostlist(hostlist, hosts):
    from shared.distributed import expand_hostlist
    assert expand_hostlist(hostlist) == hosts


def slurm_task_env(procid, job_id='4242', nodelist='gpu[07-08]', nodes=2, tasks_per_node=2):
    """The variables srun gives task `procid` of a job on `nodes` nodes with `tasks_per_node` tasks each (block
    distribution: tasks 0..k-1 on the first node)."""
    return {'SLURM_JOB_ID': job_id, 'SLURM_JOB_NODELIST': nodelist, 'SLURM_NODELIST': nodelist,
            'SLURM_JOB_NUM_NODES': str(nodes), 'SLURM_NTASKS': str(nodes * tasks_per_node),
            'SLURM_NTASKS_PER_NODE': str(tasks_per_node), 'SLURM_PROCID': str(procid),
            'SLURM_LOCALID': str(procid % tasks_per_node), 'SLURM_NODEID': str(procid // tasks_per_node)}


def test_slurm_env_to_dist_two_nodes_two_tasks():
    from shared.distributed import slurm_env_to_dist
    got = [slurm_env_to_dist(slurm_task_env(p)) for p in range(4)]
    assert [g['RANK'] for g in got] == ['0', '1', '2', '3']
    assert [g['LOCAL_RANK'] for g in got] == ['0', '1', '0', '1']
    assert {g['WORLD_SIZE'] for g in got} == {'4'} and {g['MASTER_ADDR'] for g in got} == {'gpu07'}
    assert {g['MASTER_PORT'] for g in got} == {str(12000 + 4242)}
    assert slurm_env_to_dist(slurm_task_env(0, job_id='77_3'))['MASTER_PORT'] == str(12000 + 773)
    chosen = slurm_env_to_dist({**slurm_task_env(1), 'MASTER_ADDR': 'login1', 'MASTER_PORT': '6000'})
    assert (chosen['MASTER_ADDR'], chosen['MASTER_PORT']) == ('login1', '6000')


@pytest.mark.parametrize('procid', range(4))
def test_init_distributed_mode_under_srun(procid, monkeypatch):
    import argparse
    import builtins
    import warnings
    import shared.distributed as sd
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.setenv(key, '')  # recorded, so that what init_distributed_mode sets is undone afterwards
        monkeypatch.delenv(key)
    for key, value in slurm_task_env(procid).items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(sd.dist, 'init_process_group', lambda **kw: calls.append(kw))
    monkeypatch.setattr(sd.dist, 'barrier', lambda: None)
    monkeypatch.setattr(builtins, 'print', builtins.print)  # restored after setup_for_distributed replaced it
    args = argparse.Namespace(device='cpu', dist_url='env://')
    with warnings.catch_warnings():
        sd.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (True, procid, 4, procid % 2)
    assert (args.device, args.dist_backend) == ('cpu', 'gloo')
    assert [(c['rank'], c['world_size'], c['init_method']) for c in calls] == [(procid, 4, 'env://')]
    assert (os.environ['MASTER_ADDR'], os.environ['MASTER_PORT']) == ('gpu07', str(12000 + 4242))
    assert (os.environ['RANK'], os.environ['LOCAL_RANK']) == (str(procid), str(procid % 2))


# ------------------------------------------------------------------ torchrun, 2 processes (heavy)

# Runs tools/train_baseline.py unchanged, recording every rank's parameters after each epoch; with FAULT_EPOCH set,
# rank 1 dies (os._exit, as a killed worker would) after two batches of that epoch on torchrun's first attempt only.
WRAPPER = '''
import os, sys, torch
sys.path.insert(0, {root!r})
import tools.train_baseline as tb

original = tb.train_one_epoch

def recording_train_one_epoch(model, criterion, data_loader, *a, **kw):
    epoch = a[2]
    rank = int(os.environ.get('RANK', 0))
    attempt = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))
    if os.environ.get('FAULT_EPOCH') == str(epoch) and rank == 1 and attempt == 0:
        class Dying:  # the loader, cut short by the death of the process
            def __len__(self):
                return len(data_loader)
            def __iter__(self):
                for i, batch in enumerate(data_loader):
                    if i == 2:
                        sys.stderr.write('| injected fault: rank 1 exits mid-epoch\\n')
                        sys.stderr.flush()
                        os._exit(1)
                    yield batch
        loader = Dying()
    else:
        loader = data_loader
    stats = original(model, criterion, loader, *a, **kw)
    out = os.path.join(os.environ['RECORD_DIR'], f'rank{{rank}}_epoch{{epoch}}.pth')
    torch.save({{k: v.detach().clone() for k, v in model.module.state_dict().items()}}, out)
    return stats

tb.train_one_epoch = recording_train_one_epoch
args = tb.get_args_parser().parse_args()
tb.main(args)
'''


def torchrun(tmp_path, name, extra_env, argv, max_restarts=0):
    wrapper = tmp_path / 'wrapper.py'
    wrapper.write_text(WRAPPER.format(root=ROOT))
    record = tmp_path / name
    record.mkdir()
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with the rendezvous store shared (torch's default), a restarted worker
    # can read the previous attempt's gloo addresses and fail to connect (pytorch/pytorch#135712).
    env = {**os.environ, 'RECORD_DIR': str(record), 'OMP_NUM_THREADS': '1', 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1',
           **extra_env}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           f'--max-restarts={max_restarts}', str(wrapper)] + TINY + argv + ['--output_dir', str(record / 'out')]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return record, out.stdout + out.stderr


@pytest.mark.heavy
def test_two_process_training_keeps_ranks_identical(tmp_path):
    record, log = torchrun(tmp_path, 'ddp', {}, ['--epochs', '1', '--repeated-aug'])
    assert 'backend gloo' in log
    assert_same(torch.load(record / 'rank0_epoch0.pth'), torch.load(record / 'rank1_epoch0.pth'))
    start = torch.load(record / 'rank0_epoch0.pth')
    assert_same(start, params_of(record / 'out' / 'checkpoint.pth'))


@pytest.mark.heavy
def test_worker_killed_mid_epoch_resumes_to_the_same_parameters(tmp_path):
    argv = ['--epochs', '3', '--repeated-aug']
    straight, _ = torchrun(tmp_path, 'straight', {}, argv)
    faulty, log = torchrun(tmp_path, 'faulty', {'FAULT_EPOCH': '1'}, argv, max_restarts=1)
    assert 'injected fault' in log and 'auto-resume from' in log
    for rank in (0, 1):
        assert_same(torch.load(straight / f'rank{rank}_epoch2.pth'), torch.load(faulty / f'rank{rank}_epoch2.pth'))
    assert_same(params_of(straight / 'out' / 'checkpoint.pth'), params_of(faulty / 'out' / 'checkpoint.pth'))


def test_finetune_drops_a_head_of_another_size_and_evaluates(tmp_path, capsys):
    from shared.models import create_model
    source = create_model('vit_digits_patch4_32', img_size=16, num_classes=1000)
    torch.save({'model': {f'module.{k}': v for k, v in source.state_dict().items()}}, tmp_path / 'deit.pth')
    capsys.readouterr()
    run_main(TINY + ['--finetune', str(tmp_path / 'deit.pth'), '--eval', '--output_dir', ''])
    out = capsys.readouterr().out
    assert 'Removing key head.weight from pretrained checkpoint' in out
    assert 'Accuracy of the network on the 32 test images' in out
