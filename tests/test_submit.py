"""tools/submit.py: the command it submits for each entry script, the distributed variables its job sets, the requeue
it asks for (fast), the message without submitit, and (heavy) runs through submitit's local executor: one to
completion, and one pre-empted mid-training that is requeued and ends with the parameters of an uninterrupted run."""
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBMIT = os.path.join(ROOT, 'tools', 'submit.py')

# A few seconds per epoch on one CPU core: 32 generated 16-px images, batches of 4 (as in test_distributed.py).
TINY = ['--data-set', 'FAKE', '--fake-size', '32', '--fake-classes', '4', '--input-size', '16', '--batch-size', '4',
        '--device', 'cpu', '--print-freq', '100']


def test_without_submitit_one_line_and_no_traceback(tmp_path):
    # a `submitit` that cannot be imported, ahead of the installed one on the path
    (tmp_path / 'submitit.py').write_text("raise ImportError('No module named submitit')\n")
    env = {**os.environ, 'PYTHONPATH': str(tmp_path)}
    out = subprocess.run([sys.executable, SUBMIT, '--script', 'tocom/main.py', '--output_dir', str(tmp_path / 'o')],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr == "error: tools/submit.py needs submitit: pip install '.[slurm]'\n"


def test_job_dir_output_flag_and_passed_through_arguments(tmp_path, monkeypatch):
    from tools.submit import prepare
    monkeypatch.chdir(tmp_path)
    args, job = prepare(['--script', 'tocom/main.py', '--nodes', '2', '--model', 'm', '--output_dir', 'out/a'])
    assert (args.nodes, args.ngpus, args.job_dir) == (2, 8, str(tmp_path / 'out' / 'a'))
    assert job.command() == [os.path.join(ROOT, 'tocom', 'main.py'), '--model', 'm', '--output_dir', 'out/a']
    assert job.cwd == str(tmp_path)

    # LV-ViT names its output flag --output; a script given none writes into the job dir
    args, job = prepare(['--script', 'toe/lvvit/main.py', '--job_dir', 'jobs/x', '--', '--nodes', '3'])
    assert args.nodes == 1 and job.argv == ['--nodes', '3', '--output', 'jobs/x']
    args, job = prepare(['--script', 'tavt/train.py', '--name', 'r', '--output_dir=o', '--comment', 'c'])
    assert args.job_dir == str(tmp_path / 'o') and args.comment == 'c' and job.argv == ['--name', 'r', '--output_dir=o']

    for argv, message in ((['--script', 'tocom/main.py'], 'output directory'),
                          (['--script', 'toe/EfficientTrain/ET_training.py', '--output_dir', 'o'], 'torchrun'),
                          (['--script', 'tools/compare.py', '--output_dir', 'o'], 'not a training script')):
        with pytest.raises(SystemExit, match=message):
            prepare(argv)


def test_requeue_reruns_the_same_command_with_the_scripts_resume_flags(tmp_path):
    pytest.importorskip('submitit')  # the optional extra '.[slurm]' (make test installs it)
    from submitit.helpers import DelayedSubmission
    from tools.submit import ScriptJob
    job = ScriptJob('tools/train_baseline.py', ['--output_dir', 'o', '--epochs', '3'], str(tmp_path))
    again = job.checkpoint()
    assert isinstance(again, DelayedSubmission) and not again.args and not again.kwargs
    assert again.function.command() == job.command() and again.function.cwd == job.cwd
    assert ScriptJob('avit/main_act.py', ['--output_dir', 'o'], '.').checkpoint().function.command()[-1] == \
        '--auto-resume'
    assert ScriptJob('diffrate/main.py', ['--output_dir', 'o'], '.').checkpoint().function.restart_argv == \
        ['--autoresume']

    lvvit = ScriptJob('toe/lvvit/main.py', ['--output', str(tmp_path / 'lv')], '.')
    assert lvvit.checkpoint().function.restart_argv == []  # nothing saved yet: start over
    for age, run in ((100, 'older'), (10, 'newer')):
        (tmp_path / 'lv' / 'train' / run).mkdir(parents=True)
        saved = tmp_path / 'lv' / 'train' / run / 'last.pth.tar'
        saved.write_bytes(b'')
        os.utime(saved, (time.time() - age, time.time() - age))
    twice = lvvit.checkpoint().function.checkpoint().function  # requeued twice: one --resume, the newest file
    assert twice.restart_argv == ['--resume', str(tmp_path / 'lv' / 'train' / 'newer' / 'last.pth.tar')]


class FakeJobEnvironment:
    cluster, job_id, num_tasks, global_rank, local_rank = 'slurm', '4242', 4, 3, 1
    hostnames = ['gpu07', 'gpu08']


def test_job_sets_the_distributed_variables_of_its_task(monkeypatch):
    submitit = pytest.importorskip('submitit')
    from tools.submit import ScriptJob
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.setenv(key, '')  # recorded, so that what the job sets is undone afterwards
        monkeypatch.delenv(key)
    monkeypatch.setattr(submitit, 'JobEnvironment', FakeJobEnvironment)
    ScriptJob('tocom/main.py', [], '.')._set_dist_env()
    got = {k: os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    assert got == {'RANK': '3', 'WORLD_SIZE': '4', 'LOCAL_RANK': '1', 'MASTER_ADDR': 'gpu07',
                   'MASTER_PORT': str(12000 + 4242)}

    FakeJobEnvironment.num_tasks = 1  # one task: left to run as a plain `python script`
    try:
        for key in got:
            del os.environ[key]
        ScriptJob('tocom/main.py', [], '.')._set_dist_env()
        assert not any(key in os.environ for key in got)
    finally:
        FakeJobEnvironment.num_tasks = 4


# ------------------------------------------------------------------ submitit's local executor (heavy)


def submit_local(output_dir, argv):
    """Submit tools/train_baseline.py to the local executor from this process; returns the submitit job."""
    from tools.submit import main
    return main(['--script', 'tools/train_baseline.py', '--cluster', 'local', '--ngpus', '1', '--cpus_per_task', '1',
                 '--timeout', '30', *TINY, *argv, '--output_dir', str(output_dir)])


def straight_run(output_dir, argv):
    from tools.train_baseline import get_args_parser, main
    main(get_args_parser().parse_args(TINY + argv + ['--output_dir', str(output_dir)]))
    return torch.load(output_dir / 'checkpoint.pth', weights_only=False)['model']


def assert_same(sd_a, sd_b):
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def job_log(job):
    return ''.join(open(p).read() for p in (job.paths.stdout, job.paths.stderr) if p.exists())


@pytest.mark.heavy
def test_local_job_runs_to_completion(tmp_path, monkeypatch):
    monkeypatch.setenv('PYTHONPATH', os.environ.get('PYTHONPATH', ''))  # main() prepends the repository
    job = submit_local(tmp_path / 'job', ['--epochs', '2'])  # main() waits for a local job
    assert job.done() and 'Training time' in job_log(job)
    assert len((tmp_path / 'job' / 'log.txt').read_text().splitlines()) == 2
    ckpt = torch.load(tmp_path / 'job' / 'checkpoint.pth', weights_only=False)
    assert ckpt['epoch'] == 1
    assert_same(straight_run(tmp_path / 'straight', ['--epochs', '2']), ckpt['model'])


def _children(pid):
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        return [int(c) for c in f.read().split()]


@pytest.mark.heavy
def test_preempted_local_job_is_requeued_and_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    import signal
    import threading

    argv = ['--epochs', '3']
    out = tmp_path / 'job'
    log = out / 'log.txt'
    interrupted = {}

    def preempt_after_first_epoch():
        # the job's task (the controller's child) gets SIGUSR2, submitit's pre-emption signal, once epoch 0 is saved
        deadline = time.time() + 600
        while time.time() < deadline:
            tasks = [t for p in _children(os.getpid()) for t in _children(p)]
            if log.exists() and log.read_text().count('\n') >= 1 and tasks:
                interrupted['epochs_logged'] = log.read_text().count('\n')
                os.kill(tasks[0], signal.SIGUSR2)
                return
            time.sleep(0.2)

    monkeypatch.setenv('PYTHONPATH', os.environ.get('PYTHONPATH', ''))
    watcher = threading.Thread(target=preempt_after_first_epoch, daemon=True)
    watcher.start()
    job = submit_local(out, argv)
    watcher.join(timeout=5)
    # the signal went out while the job still had epochs to run (the watcher never fires before epoch 0 is logged)
    assert 'epochs_logged' in interrupted, 'the job ended before it could be pre-empted'
    assert interrupted['epochs_logged'] < 3, f"pre-empted only after all 3 epochs: {interrupted['epochs_logged']}"
    text = job_log(job)
    assert 'this job is preempted' in text and 'Requeued job' in text and 'auto-resume from' in text
    assert len(log.read_text().splitlines()) == 3
    final = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert final['epoch'] == 2
    assert_same(straight_run(tmp_path / 'straight', argv), final['model'])
