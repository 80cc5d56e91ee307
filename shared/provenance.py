"""What a measurement was made with: the code version, the device's name, and the files' digests."""
import hashlib
import os
import platform
import subprocess

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def file_sha256(path):
    """SHA-256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit(root=REPO_ROOT):
    """HEAD of the checkout at `root`, with '+dirty' when tracked files differ from it; 'unknown' outside git."""
    def git(*cmd):
        return subprocess.run(['git', *cmd], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              timeout=30)
    try:
        head = git('rev-parse', 'HEAD')
        if head.returncode != 0:
            return 'unknown'
        dirty = git('status', '--porcelain', '--untracked-files=no').stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return head.stdout.strip() + ('+dirty' if dirty else '')


def device_name(device):
    """The GPU's name, or the CPU's model name (platform.processor() is empty on most Linux systems)."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown'
