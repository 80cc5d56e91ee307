import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests never reach a model hub or a dataset URL.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# One intra-op thread per process: the suite runs as 2 xdist workers on 2 cores, and oversubscribed cores made torch
# up to ten times slower here. Subprocesses inherit the variable.
os.environ.setdefault('OMP_NUM_THREADS', '1')
import torch  # noqa: E402

torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))


@pytest.fixture
def repo_root():
    return ROOT


@pytest.fixture
def compare_ctx(tmp_path):
    """A tools/compare.py context on the digits with a random-weight baseline and the smallest budgets."""
    from shared.compare_api import Context, make_data_args
    from shared.models import create_model
    torch.manual_seed(0)
    base = tmp_path / 'baseline.pth'
    torch.save({'model': create_model('vit_digits_patch4_32').state_dict()}, base)
    return Context(base_checkpoint=str(base), model_name='vit_digits_patch4_32', model_kwargs={'num_classes': 10},
                   data_args=make_data_args(), cache_dir=str(tmp_path / 'cache'), device=torch.device('cpu'),
                   epochs=1, quick=True)


def run_script(args, cwd=None, env=None, timeout=600):
    """Run a repository script with this interpreter; returns the CompletedProcess (stdout+stderr merged)."""
    import subprocess
    full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or ROOT, env=full_env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def torchrun(args, nproc=2, cwd=None, env=None, timeout=900, extra=()):
    """torchrun --nproc_per_node=N on the CPU (gloo) for a repository script."""
    import subprocess
    full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', **(env or {})}
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--standalone', *extra,
           *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
