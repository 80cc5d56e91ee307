"""Two torchrun "nodes" on this machine (one process each, CPU, gloo, c10d rendezvous) train tools/train_baseline.py
for one epoch to the same parameters as one node running two processes (heavy)."""
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--data-set', 'FAKE', '--fake-size', '32', '--fake-classes', '4', '--input-size', '16', '--batch-size', '4',
        '--device', 'cpu', '--print-freq', '100', '--epochs', '1']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun_cmd(launcher_args, output_dir):
    return [sys.executable, '-m', 'torch.distributed.run', *launcher_args,
            os.path.join(ROOT, 'tools', 'train_baseline.py'), *TINY, '--output_dir', str(output_dir)]


def torchrun_env():
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: the workers open their own store instead of reusing the agent's
    # rendezvous one, which on the CPU sometimes handed them stale gloo addresses (pytorch/pytorch#135712)
    return {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}


def model_of(output_dir):
    return torch.load(os.path.join(output_dir, 'checkpoint.pth'), weights_only=False)['model']


@pytest.mark.heavy
def test_two_nodes_train_as_one_node_with_two_processes(tmp_path):
    endpoint = f'127.0.0.1:{free_port()}'
    nodes = [subprocess.Popen(
        torchrun_cmd(['--nnodes', '2', '--node-rank', str(rank), '--nproc_per_node', '1', '--rdzv-backend', 'c10d',
                      '--rdzv-endpoint', endpoint, '--rdzv-id', 'multinode-test'], tmp_path / 'two_nodes'),
        cwd=ROOT, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]  # started together: the rendezvous waits for both
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=900)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-3000:]
    # one rank on each node (c10d numbers the nodes in the order they join)
    assert sorted('(rank 1)' in log for log in logs) == [False, True]
    assert all('backend gloo' in log for log in logs)

    one_node = subprocess.run(torchrun_cmd(['--standalone', '--nproc_per_node', '2'], tmp_path / 'one_node'),
                              cwd=ROOT, env=torchrun_env(), capture_output=True, text=True, timeout=900)
    assert one_node.returncode == 0, one_node.stdout[-3000:] + one_node.stderr[-3000:]

    two, one = model_of(tmp_path / 'two_nodes'), model_of(tmp_path / 'one_node')
    assert two.keys() == one.keys()
    for key in one:
        assert torch.equal(two[key], one[key]), key
