"""The one training loop (shared.trainer) and its output folder (shared.rundir): exact resume, log.txt with each
finished epoch once, leftovers removed, a second live run refused, NaN/Inf stopping before anything is saved."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from shared.amp import NativeScaler
from shared.checkpoint import register_random_stream, safe_load
from shared.engine import evaluate, train_one_epoch
from shared.errors import TrainingDiverged, UserError
from shared.rundir import LOCK_NAME, RunDir, RunDirBusy
from shared.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Killed(BaseException):
    """Stands for the death of the process."""


def tiny_run(out, epochs, auto_resume=True, corrupt=None, random_stream=None, killed_at=None):
    """A 4 -> 3 linear classifier on 24 random points, trained by shared.engine's epoch inside a Trainer.
    corrupt(epoch, model): called after each train epoch (to inject NaN weights); killed_at: the epoch in whose
    second step the process dies."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    data = torch.utils.data.TensorDataset(x, y)
    train_loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=torch.utils.data.RandomSampler(data),
                                               drop_last=True)
    val_loader = torch.utils.data.DataLoader(data, batch_size=6)
    model = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(4, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs)
    scaler = NativeScaler(torch.device('cpu'), False)
    criterion = torch.nn.CrossEntropyLoss()
    args = argparse.Namespace(output_dir=str(out), epochs=epochs, auto_resume=auto_resume, resume='', start_epoch=0,
                              eval=False)
    draws = []

    def train_epoch(epoch):
        steps = []

        def loss_fn(m, samples, targets):
            steps.append(1)
            if epoch == killed_at and len(steps) == 2:
                raise Killed
            if random_stream is not None:
                draws.append(random_stream.random())
            return criterion(m(samples), targets), {}
        stats = train_one_epoch(model, criterion, train_loader, optimizer, torch.device('cpu'), epoch, scaler,
                                loss_fn=loss_fn, print_freq=100)
        if corrupt is not None:
            corrupt(epoch, model)
        return stats

    trainer = Trainer(args, model, optimizer, scheduler, scaler, train_loader=train_loader, train_epoch=train_epoch,
                      evaluate=lambda epoch: evaluate(val_loader, model, torch.device('cpu'), print_freq=100))
    trainer.resume()
    trainer.fit()
    return model, draws


def log_lines(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def assert_same_checkpoint(a, b):
    ca, cb = safe_load(os.path.join(a, 'checkpoint.pth')), safe_load(os.path.join(b, 'checkpoint.pth'))
    assert ca['model'].keys() == cb['model'].keys()
    for k in ca['model']:
        assert torch.equal(ca['model'][k], cb['model'][k]), k
    sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert ca['lr_scheduler'] == cb['lr_scheduler']


def test_split_run_equals_straight_run(tmp_path):
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    tiny_run(straight, 3)
    with pytest.raises(Killed):
        tiny_run(split, 3, killed_at=2)
    tiny_run(split, 3)  # same folder: continues at epoch 2 by itself
    assert_same_checkpoint(straight, split)
    assert log_lines(straight) == log_lines(split)
    assert [s['epoch'] for s in log_lines(split)] == [0, 1, 2]


def test_registered_random_stream_continues_where_it_stopped(tmp_path):
    import random
    _, straight = tiny_run(tmp_path / 'a', 3, random_stream=register_random_stream('test_stream', random.Random(7)))
    first = random.Random(7)
    with pytest.raises(Killed):
        tiny_run(tmp_path / 'b', 3, random_stream=register_random_stream('test_stream', first), killed_at=2)
    # a fresh process builds the stream anew from its seed; the checkpoint must move it on to where epoch 2 starts
    _, second = tiny_run(tmp_path / 'b', 3, random_stream=register_random_stream('test_stream', random.Random(7)))
    assert second == straight[len(straight) - len(second):] and len(second) == len(straight) // 3


def test_log_has_each_epoch_once_after_a_kill_between_checkpoint_and_log(tmp_path, monkeypatch):
    out = tmp_path / 'run'
    original = RunDir.append_log

    def dies_at_epoch_1(self, stats):
        if stats['epoch'] == 1:
            raise KeyboardInterrupt  # the process dies after checkpoint.pth of epoch 1, before its log line
        original(self, stats)

    monkeypatch.setattr(RunDir, 'append_log', dies_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(out, 3)
    assert [s['epoch'] for s in log_lines(out)] == [0]
    monkeypatch.setattr(RunDir, 'append_log', original)
    with open(out / 'log.txt', 'a') as f:  # and a stray line of an epoch no checkpoint finished
        f.write(json.dumps({'epoch': 2, 'stray': True}) + '\n')
    tiny_run(out, 3)
    tiny_run(tmp_path / 'straight', 3)
    assert log_lines(out) == log_lines(tmp_path / 'straight')


def test_leftover_of_an_interrupted_save_is_removed(tmp_path, capsys):
    tiny_run(tmp_path, 1)
    leftover = tmp_path / '.checkpoint.pth.k3j2.tmp'
    leftover.write_bytes(b'half a checkpoint')
    before = (tmp_path / 'checkpoint.pth').read_bytes()
    tiny_run(tmp_path, 2)
    assert not leftover.exists()
    assert 'removed 1 leftover file' in capsys.readouterr().out
    assert (tmp_path / 'checkpoint.pth').read_bytes() != before


def test_nan_weights_stop_before_anything_is_saved(tmp_path):
    def corrupt(epoch, model):
        if epoch == 1:
            with torch.no_grad():
                model[1].weight[0, 0] = float('nan')

    with pytest.raises(TrainingDiverged, match=r'1\.weight holds NaN/Inf'):
        tiny_run(tmp_path / 'x', 3, corrupt=corrupt)
    ckpt = safe_load(tmp_path / 'x' / 'checkpoint.pth')
    assert ckpt['epoch'] == 0 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert [s['epoch'] for s in log_lines(tmp_path / 'x')] == [0]


def test_nan_loss_stops_with_a_message(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    data = torch.utils.data.TensorDataset(torch.full((4, 2), float('nan')), torch.zeros(4, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = torch.nn.CrossEntropyLoss()
    with pytest.raises(TrainingDiverged, match='loss is nan at epoch 0'):
        train_one_epoch(model, criterion, loader, optimizer, torch.device('cpu'), 0,
                        NativeScaler(torch.device('cpu'), False), print_freq=100,
                        loss_fn=lambda m, x, y: (criterion(m(x), y), {}))


def test_auto_resume_off_refuses_a_folder_holding_a_run(tmp_path):
    tiny_run(tmp_path, 1)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != LOCK_NAME}
    with pytest.raises(UserError, match='holds an earlier run and auto-resume is off'):
        tiny_run(tmp_path, 2, auto_resume=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != LOCK_NAME} == files


HOLDER = '''
import sys, time
sys.path.insert(0, {root!r})
from shared.rundir import RunDir
held = RunDir(sys.argv[1]).acquire()
print('holding', flush=True)
time.sleep(120)
'''


def test_second_live_run_is_refused_and_a_dead_one_releases_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', HOLDER.format(root=ROOT), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'holding'
        with pytest.raises(RunDirBusy, match=rf'in use by a live run \(pid {holder.pid} on '):
            RunDir(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    run_dir = RunDir(tmp_path).acquire()  # the kernel dropped the dead holder's lock
    run_dir.release()


def test_cli_error_is_one_line_without_traceback(tmp_path):
    out = tmp_path / 'busy'
    holder = subprocess.Popen([sys.executable, '-c', HOLDER.format(root=ROOT), str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == 'holding'
        run = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'train_baseline.py'), '--data-set', 'FAKE',
                              '--fake-size', '8', '--input-size', '16', '--batch-size', '4', '--device', 'cpu',
                              '--output_dir', str(out)], capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode == 2, run.stderr
    error_lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert error_lines == [error_lines[0]] and error_lines[0].startswith('error: output folder ')
    assert 'Traceback' not in run.stderr


def test_accumulated_steps_equal_one_step_of_the_whole_batch():
    """--accum-iter 2 over batches of 4 makes the update of one batch of 8 (no dropout, no mixup), and DeiT's lr
    scaling counts the accumulated batch."""
    from shared.args import deit_parser
    from shared.engine import scale_lr

    def trained(batch_size, accum_iter):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
        data = torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,)))
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size)  # same order for both
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        criterion = torch.nn.CrossEntropyLoss()
        train_one_epoch(model, criterion, loader, optimizer, torch.device('cpu'), 0,
                        NativeScaler(torch.device('cpu'), False), print_freq=100, accum_iter=accum_iter,
                        loss_fn=lambda m, x, y: (criterion(m(x), y), {}))
        return model.state_dict(), optimizer.state_dict()['state'][0]['step']

    (accumulated, steps_a), (whole, steps_w) = trained(4, 2), trained(8, 1)
    assert steps_a == steps_w == 2
    for k in whole:
        assert torch.allclose(accumulated[k], whole[k], atol=1e-6), k
    (single, _) = trained(4, 1)
    assert not all(torch.allclose(single[k], whole[k], atol=1e-6) for k in whole)  # the test can fail
    args = deit_parser().parse_args(['--batch-size', '64', '--lr', '5e-4', '--accum-iter', '4'])
    assert scale_lr(args) == pytest.approx(5e-4 * 64 * 4 / 512)
