"""Process-group set-up and rank helpers (DeiT's utils, made to work single-process and on CPU too)."""
import atexit
import builtins
import datetime
import os
import re
import warnings

import torch
import torch.distributed as dist

_warned_cpu_fallback = False


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def destroy_process_group():
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist_avail_and_initialized():
        dist.barrier()


def save_on_master(obj, path):
    """Save from rank 0 only, atomically (a crash mid-save never corrupts the previous file)."""
    if is_main_process():
        from shared.checkpoint import atomic_save
        atomic_save(obj, path)


def all_reduce_mean(value):
    """Mean of a python number or tensor over all ranks (identity when single-process)."""
    if not is_dist_avail_and_initialized():
        return value
    t = torch.as_tensor(value, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    t /= get_world_size()
    return t.item() if t.numel() == 1 else t


def _collective_device():
    # nccl only reduces CUDA tensors; gloo only CPU ones.
    if is_dist_avail_and_initialized() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def unwrap_model(model):
    """The module inside DDP (the originals' `model.module`, which crashes single-process)."""
    return model.module if hasattr(model, 'module') else model


def seed_per_rank(seed, python_random=False):
    """DeiT's seeding: torch and numpy get seed + rank (so ranks augment differently); python's `random` only when
    asked, because the DeiT copies the originals carry leave it unseeded. Returns the rank's seed."""
    import numpy as np
    seed = seed + get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    if python_random:
        import random
        random.seed(seed)
    return seed


def resolve_device(name):
    """torch.device for `name`, falling back to the CPU (saying so once) when CUDA is asked for but absent."""
    global _warned_cpu_fallback
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        if not _warned_cpu_fallback and is_main_process():
            print(f"| device '{name}' requested but no CUDA GPU is present: running on the CPU")
        _warned_cpu_fallback = True
        return torch.device('cpu')
    return device


def setup_for_distributed(is_master):
    """Silence print() on non-master ranks (pass force=True to print anyway), as DeiT does."""
    real_print = builtins.print

    def print_from_master(*args, force=False, **kwargs):
        # every rank prints the same epoch logs: only rank 0 (or a caller insisting with force=True) writes them
        if not (is_master or force):
            return
        real_print(*args, **kwargs)

    builtins.print = print_from_master
    if not is_master:
        warnings.filterwarnings('ignore')


def expand_hostlist(hostlist):
    """The host names of a SLURM host list, in order: `gpu[01-03,7],cpu1` -> gpu01 gpu02 gpu03 gpu7 cpu1.

    Commas separate hosts except inside brackets; each bracket group is a comma list of numbers or `lo-hi` ranges,
    printed at the width of `lo` (SLURM keeps the zero padding); several groups in one name multiply out."""
    hosts = []
    for name in _split_outside_brackets(hostlist):
        expansions = ['']
        for literal, group in re.findall(r'([^\[]*)(?:\[([^\]]*)\])?', name):
            suffixes = [literal + number for number in _expand_range_group(group)] if group else [literal]
            expansions = [head + tail for head in expansions for tail in suffixes]
        hosts.extend(expansions)
    return hosts


def _split_outside_brackets(text):
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {'[': 1, ']': -1}.get(char, 0)
        if char == ',' and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _expand_range_group(group):
    numbers = []
    for item in group.split(','):
        lo, _, hi = item.strip().partition('-')
        if not hi:
            numbers.append(lo)
            continue
        numbers.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return numbers


def default_master_port(job_id):
    """A rendezvous port every task of one SLURM job computes alike (from the job id), different for jobs that share
    a node: 12000-31999, below Linux's ephemeral range (32768+) where outgoing connections take their ports."""
    digits = ''.join(ch for ch in str(job_id) if ch.isdigit())  # array jobs are named 1234_5
    return 12000 + int(digits or 0) % 20000


def slurm_env_to_dist(env):
    """The torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, as strings) of one
    task started by `srun` without torchrun, from SLURM's variables in `env`. MASTER_ADDR and MASTER_PORT set by the
    user win; otherwise the address is the step's first host, where SLURM places task 0."""
    nodelist = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST') or env.get('SLURM_NODELIST')
    master_addr = env.get('MASTER_ADDR') or (expand_hostlist(nodelist)[0] if nodelist else '127.0.0.1')
    master_port = env.get('MASTER_PORT') or str(default_master_port(env.get('SLURM_JOB_ID', '0')))
    return {'RANK': str(int(env['SLURM_PROCID'])), 'WORLD_SIZE': str(int(env.get('SLURM_NTASKS', 1))),
            'LOCAL_RANK': str(int(env.get('SLURM_LOCALID', 0))), 'MASTER_ADDR': master_addr,
            'MASTER_PORT': str(master_port)}


def init_distributed_mode(args):
    """Initialise from torchrun / `torch.distributed.launch --use_env` env vars, the old launcher's `--local_rank`,
    SLURM, or fall back to a single process. Sets args.distributed, rank, world_size, gpu, dist_backend and makes
    args.device a device that exists here."""
    requested = getattr(args, 'device', 'cuda')
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', getattr(args, 'local_rank', 0) or 0))
    elif 'SLURM_PROCID' in os.environ:
        # `srun python script.py`: one task per GPU, SLURM numbers them; env:// reads the variables set here
        slurm = slurm_env_to_dist(os.environ)
        for key, value in slurm.items():
            os.environ.setdefault(key, value)
        args.rank, args.world_size, args.gpu = int(slurm['RANK']), int(slurm['WORLD_SIZE']), int(slurm['LOCAL_RANK'])
    else:
        print('Not using distributed mode')
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        args.device = str(resolve_device(requested))
        return

    args.distributed = True
    use_cuda = torch.device(requested).type == 'cuda' and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
        args.dist_backend = 'nccl'
    else:
        args.device = str(resolve_device(requested))
        args.dist_backend = 'gloo'
    dist_url = getattr(args, 'dist_url', 'env://') or 'env://'
    print(f'| distributed init (rank {args.rank}): {dist_url}, backend {args.dist_backend}', flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=dist_url, world_size=args.world_size,
                            rank=args.rank, timeout=datetime.timedelta(minutes=30))
    # Tear the group down before the interpreter does: a gloo group left to die with the process sometimes aborted
    # it at exit ("terminate called without an active exception") after a run had finished.
    atexit.register(destroy_process_group)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def wrap_ddp(model, args, find_unused_parameters=False, model_ema=None):
    """(model, model_without_ddp): the model in DistributedDataParallel when the run is distributed (device_ids only
    on CUDA, where each rank owns one GPU), and the bare module either way.

    model_ema: the weight EMA copied from the model before wrapping. Each rank initialised its own model from its own
    seed and DDP replaces the weights by rank 0's; the EMA is reset to those too, so that every rank averages the same
    weights (otherwise each rank's EMA keeps its own initialisation, evaluations average different models, and a
    resumed run, which gives every rank the saved rank-0 EMA, cannot continue the uninterrupted one)."""
    if not getattr(args, 'distributed', False):
        return model, model
    device = torch.device(args.device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None,
        find_unused_parameters=find_unused_parameters)
    if model_ema is not None:
        from shared.checkpoint import ema_module
        ema_module(model_ema).load_state_dict(ddp.module.state_dict())
    return ddp, ddp.module
