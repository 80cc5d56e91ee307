#!/usr/bin/env python
"""Submit a training script of this repository to SLURM with submitit (`pip install '.[slurm]'`), the way DeiT's
run_with_submitit.py submits its main.py: one task per GPU, the job requeued when it is pre-empted or about to time
out, the requeued job rerunning the same command, which resumes from the checkpoint in its output directory.

    python tools/submit.py --script tocom/main.py --nodes 2 --ngpus 8 --partition gpu --timeout 2800 \
        --model deit_small_patch16_224 --data-path /data/imagenet --output_dir output/tocom_s

The launcher's own flags are listed below; every other argument (or everything after `--`) goes to the script. The
job directory (submitit's logs and pickles) is --job_dir, else the script's output directory; a script given no
output directory writes to the job directory. `--cluster local` runs the job on this machine (submitit's local
executor), `--cluster debug` in this process.

How a requeued job continues, by script: the DeiT-style scripts (tools/train_baseline.py, tocom/main.py,
toe/deit/main.py, toe/EfficientTrain/main.py) resume from <output_dir>/checkpoint.pth by default; avit/main_act.py
and diffrate/main.py are given their auto-resume flag on requeue; toe/lvvit/main.py is given --resume with the
newest last.pth.tar under <output>/train/; tavt/train.py saves no optimizer state, so a requeued TAVT run starts
over.
"""
import argparse
import glob
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a plain checkout too

from shared.distributed import default_master_port  # noqa: E402

MISSING_SUBMITIT = "error: tools/submit.py needs submitit: pip install '.[slurm]'"


def _no_extra_flags(argv):
    return []


def _lvvit_resume_flags(argv):
    output = _flag_value(argv, '--output') or './output'
    saved = glob.glob(os.path.join(output, 'train', '*', 'last.pth.tar'))
    return ['--resume', max(saved, key=os.path.getmtime)] if saved else []


# entry script -> (the flag naming its output directory, the flags a requeued run adds to the same command)
ENTRY_SCRIPTS = {
    'tools/train_baseline.py': ('--output_dir', _no_extra_flags),
    'tocom/main.py': ('--output_dir', _no_extra_flags),
    'toe/deit/main.py': ('--output_dir', _no_extra_flags),
    'toe/EfficientTrain/main.py': ('--output_dir', _no_extra_flags),
    'toe/lvvit/main.py': ('--output', _lvvit_resume_flags),
    'avit/main_act.py': ('--output_dir', lambda argv: ['--auto-resume']),
    'diffrate/main.py': ('--output_dir', lambda argv: ['--autoresume']),
    'tavt/train.py': ('--output_dir', _no_extra_flags),
}
# a driver that starts torchrun itself, once per curriculum chunk, on one machine
NOT_SUBMITTABLE = {
    'toe/EfficientTrain/ET_training.py': 'it starts torchrun itself for each chunk: run it inside a one-node '
                                         'allocation, or submit toe/EfficientTrain/main.py',
}


def _flag_value(argv, flag):
    """The value given to `flag` in argv (`--flag v` or `--flag=v`; the last one wins, as with argparse), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + '='):
            value = arg[len(flag) + 1:]
    return value


def entry_script(path):
    """The repository-relative name of an entry script given as a path (relative to the repository or the cwd)."""
    absolute = path if os.path.isabs(path) else os.path.join(ROOT, path)
    if not os.path.isfile(absolute):
        absolute = os.path.abspath(path)
    name = os.path.relpath(absolute, ROOT).replace(os.sep, '/')
    if name in NOT_SUBMITTABLE:
        raise SystemExit(f'error: --script {path}: {NOT_SUBMITTABLE[name]}')
    if name not in ENTRY_SCRIPTS:
        raise SystemExit(f'error: --script {path}: not a training script of this repository '
                         f'({", ".join(sorted(ENTRY_SCRIPTS))})')
    return name


class ScriptJob:
    """The submitted callable: runs `python <script> <argv>` in this process (so that submitit's pre-emption signal
    handler runs in the training process) as one task of a torch.distributed job."""

    def __init__(self, script, argv, cwd):
        self.script, self.argv, self.cwd = script, list(argv), cwd
        self.restart_argv = []  # flags added when requeued, recomputed at each requeue
        self._checkpointed = False

    def command(self):
        return [os.path.join(ROOT, self.script)] + self.argv + self.restart_argv

    def __call__(self):
        self._set_dist_env()
        os.chdir(self.cwd)  # the script's relative paths mean what they meant where the job was submitted
        sys.argv = self.command()
        try:
            runpy.run_path(sys.argv[0], run_name='__main__')
        except SystemExit as e:
            # submitit's requeue exits through here too; only the script's own failures become the job's error
            if self._checkpointed or e.code in (None, 0):
                raise
            raise RuntimeError(f'{self.script} stopped with exit status {e.code}; see the job log') from None

    def _set_dist_env(self):
        import submitit
        job = submitit.JobEnvironment()
        if job.num_tasks == 1:
            return  # a single task runs as `python script` does (under srun, shared.distributed reads SLURM's env)
        master_addr = job.hostnames[0] if job.cluster == 'slurm' else '127.0.0.1'
        os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank))
        os.environ.setdefault('MASTER_ADDR', master_addr)
        os.environ.setdefault('MASTER_PORT', str(default_master_port(job.job_id)))

    def checkpoint(self):
        """Called by submitit on pre-emption or before the time limit: requeue the same command. The scripts save
        a checkpoint every epoch, so nothing is saved here; the rerun resumes from the last one."""
        import submitit
        self._checkpointed = True
        requeued = type(self)(self.script, self.argv, self.cwd)
        requeued.restart_argv = ENTRY_SCRIPTS[self.script][1](self.argv)
        return submitit.helpers.DelayedSubmission(requeued)


def get_args_parser():
    p = argparse.ArgumentParser('Submit a training script with submitit', allow_abbrev=False,
                                epilog='Other arguments, or all those after --, are passed to the script.')
    p.add_argument('--script', required=True, help='entry script, e.g. tocom/main.py')
    p.add_argument('--ngpus', default=8, type=int, help='GPUs (and tasks) per node')
    p.add_argument('--nodes', default=1, type=int, help='number of nodes')
    p.add_argument('--timeout', default=2800, type=int, help='job time limit in minutes')
    p.add_argument('--job_dir', default='', type=str,
                   help="submitit's folder (logs, pickles); default: the script's output directory")
    p.add_argument('--partition', default=None, type=str, help='SLURM partition')
    p.add_argument('--use_volta32', action='store_true', help='ask for 32 GB V100s (constraint volta32gb)')
    p.add_argument('--comment', default='', type=str, help='SLURM comment, e.g. why the job was submitted')
    p.add_argument('--cpus_per_task', default=10, type=int)
    p.add_argument('--cluster', default=None, choices=['slurm', 'local', 'debug'],
                   help="submitit's executor (default: slurm where sbatch exists, else local)")
    return p


def split_argv(argv):
    """(launcher args, script args): everything after `--` belongs to the script, as do flags the launcher does not
    know."""
    if '--' in argv:
        cut = argv.index('--')
        args, unknown = get_args_parser().parse_known_args(argv[:cut])
        return args, unknown + argv[cut + 1:]
    return get_args_parser().parse_known_args(argv)


def prepare(argv):
    """(launcher args, ScriptJob) for a command line: the job directory settled and the script's output flag set."""
    args, script_argv = split_argv(argv)
    args.script = entry_script(args.script)
    output_flag = ENTRY_SCRIPTS[args.script][0]
    output_dir = _flag_value(script_argv, output_flag)
    if not args.job_dir:
        if not output_dir:
            raise SystemExit(f'error: give the script an output directory ({output_flag}) or --job_dir: a requeued '
                             f'job resumes from the checkpoint there')
        args.job_dir = output_dir
    elif not output_dir:
        script_argv += [output_flag, args.job_dir]
    args.job_dir = os.path.abspath(args.job_dir)
    return args, ScriptJob(args.script, script_argv, os.getcwd())


def build_executor(args, submitit):
    executor = submitit.AutoExecutor(folder=os.path.join(args.job_dir, 'submitit', '%j'), cluster=args.cluster,
                                     slurm_max_num_timeout=30)
    # SLURM-only settings, passed when given (the local executor ignores slurm_-prefixed ones)
    slurm_settings = {'slurm_partition': args.partition, 'slurm_comment': args.comment,
                      'slurm_constraint': 'volta32gb' if args.use_volta32 else None}
    gpus = args.ngpus if executor.cluster == 'slurm' else _local_gpus(args.ngpus)
    executor.update_parameters(
        name=os.path.splitext(os.path.basename(args.script))[0], nodes=args.nodes, tasks_per_node=args.ngpus,
        gpus_per_node=gpus, cpus_per_task=args.cpus_per_task, mem_gb=40 * args.ngpus, timeout_min=args.timeout,
        slurm_signal_delay_s=120, **{key: value for key, value in slurm_settings.items() if value})
    return executor


def _local_gpus(wanted):
    # the local executor refuses more GPUs than the machine has; a CPU-only machine runs the tasks on the CPU
    import torch
    return min(wanted, torch.cuda.device_count())


def main(argv=None):
    try:
        import submitit
    except ImportError:
        print(MISSING_SUBMITIT, file=sys.stderr)
        sys.exit(2)
    args, job = prepare(sys.argv[1:] if argv is None else argv)
    if args.cluster in ('local', 'debug') and args.nodes != 1:
        raise SystemExit(f'error: --cluster {args.cluster} runs on this machine only: --nodes 1')
    # the job process unpickles ScriptJob from this module and imports the repository's packages
    os.environ['PYTHONPATH'] = os.pathsep.join([ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    executor = build_executor(args, submitit)
    submitted = executor.submit(job)
    print(f'Submitted job {submitted.job_id}: {" ".join(job.command())}')
    print(f'Logs in {os.path.join(args.job_dir, "submitit", str(submitted.job_id))}')
    if executor.cluster == 'local':
        submitted.result()  # the job runs under this process: wait for it (requeues included)
        print(f'Job {submitted.job_id} finished')
    return submitted


if __name__ == '__main__':
    from tools.submit import main as _main  # pickle ScriptJob as tools.submit.ScriptJob, not __main__.ScriptJob
    _main()
