"""Process-group set-up and rank helpers (DeiT's utils, made to work single-process and on CPU too)."""
import atexit
import builtins
import datetime
import os
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
    builtin_print = builtins.print

    def print(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print
    if not is_master:
        warnings.filterwarnings('ignore')


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
        args.rank = int(os.environ['SLURM_PROCID'])
        args.world_size = int(os.environ.get('SLURM_NTASKS', 1))
        ngpu = max(torch.cuda.device_count(), 1)
        args.gpu = args.rank % ngpu
        os.environ.setdefault('RANK', str(args.rank))
        os.environ.setdefault('WORLD_SIZE', str(args.world_size))
        os.environ.setdefault('LOCAL_RANK', str(args.gpu))
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            nodes = os.environ.get('SLURM_NODELIST', '127.0.0.1')
            os.environ['MASTER_ADDR'] = nodes.split(',')[0].split('[')[0]
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


def wrap_ddp(model, args, find_unused_parameters=False):
    """(model, model_without_ddp): the model in DistributedDataParallel when the run is distributed (device_ids only
    on CUDA, where each rank owns one GPU), and the bare module either way."""
    if not getattr(args, 'distributed', False):
        return model, model
    device = torch.device(args.device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None,
        find_unused_parameters=find_unused_parameters)
    return ddp, ddp.module
