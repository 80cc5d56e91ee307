"""The output folder of one training run: one live run at a time, no leftovers of an interrupted save, and a
`log.txt` that holds each finished epoch exactly once, whatever sequence of kills and restarts came before.

Only the main process (rank 0) owns the folder; on other ranks every method is a no-op.
"""
import fcntl
import glob
import json
import os
import socket

from shared.errors import UserError

LOCK_NAME = '.run.lock'


class RunDirBusy(UserError):
    """Another live process is training into the same output folder."""


class RunDir:
    """`with RunDir(path):` holds an advisory lock on <path>/.run.lock for the life of the process.

    The lock is flock(2)'s: the kernel drops it when its holder dies, so a killed run never blocks its own restart,
    while a second live run is refused with the holder's pid and host."""

    def __init__(self, path, active=True, log_name='log.txt'):
        self.path = os.fspath(path) if path else ''
        self.active = bool(self.path) and active
        self.log_path = os.path.join(self.path, log_name) if self.path else ''
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        if not self.active or self._fd is not None:
            return self
        os.makedirs(self.path, exist_ok=True)
        lock_path = os.path.join(self.path, LOCK_NAME)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'another process'
            os.close(fd)
            raise RunDirBusy(f'output folder {self.path} is in use by a live run ({holder}); wait for it to end or '
                             'pass another --output_dir') from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode(), 0)
        self._fd = fd
        self.remove_leftovers()
        return self

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    __del__ = release

    def remove_leftovers(self):
        """Delete the temporary files of saves that a killed process left half-written (shared.checkpoint's atomic
        writes name them `.<target>.<random>.tmp`; the target itself was never touched)."""
        removed = []
        for tmp in glob.glob(os.path.join(glob.escape(self.path), '.*.tmp')):
            os.remove(tmp)
            removed.append(os.path.basename(tmp))
        if removed:
            print(f'| removed {len(removed)} leftover file(s) of an interrupted save in {self.path}: '
                  f'{", ".join(sorted(removed))}')
        return removed

    # ---- log.txt

    def append_log(self, stats):
        """One JSON line per finished epoch, as DeiT's log.txt."""
        if not self.active:
            return
        with open(self.log_path, 'a') as f:
            f.write(json.dumps(stats) + '\n')

    def restore_log(self, history):
        """Make log.txt hold exactly `history` (the epochs the checkpoint has finished), replacing what a killed run
        may have left: lines of epochs after the checkpoint, or a missing line of the checkpoint's own epoch."""
        if not self.active:
            return
        from shared.checkpoint import atomic_write_text
        atomic_write_text(''.join(json.dumps(s) + '\n' for s in history), self.log_path)
