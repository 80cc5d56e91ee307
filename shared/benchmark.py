"""Timing in ToMe's convention: random input, eval mode, no grad, warm-up runs thrown away, images per second at a
stated batch size and dtype. Every speed figure of the project is a ratio of two such measurements taken in one run."""
import time

import torch


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@torch.no_grad()
def throughput(model, input_size=(3, 224, 224), batch_size=64, device='cpu', dtype=torch.float32, runs=20,
               warmup=5, forward=None, inputs=None):
    """Images per second of `forward(model, x)` (default `model(x)`). `inputs` replaces the random batch (for
    data-dependent models, whose speed depends on the images)."""
    device = torch.device(device)
    model = model.eval().to(device)
    x = inputs if inputs is not None else torch.randn(batch_size, *input_size)
    x = x.to(device=device, dtype=dtype)
    batch_size = x.shape[0]
    run = forward or (lambda m, t: m(t))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(warmup):
            run(model, x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(runs):
            run(model, x)
        _sync(device)
        elapsed = time.perf_counter() - start
    return batch_size * runs / elapsed


def latency_ms(model, input_size=(3, 224, 224), **kwargs):
    """Mean batch-1 latency in milliseconds."""
    return 1000.0 / throughput(model, input_size, batch_size=1, **kwargs)


def peak_memory_mb(fn, device):
    """Peak memory of running fn(): CUDA's allocator peak on a GPU, the process's resident peak on the CPU."""
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
