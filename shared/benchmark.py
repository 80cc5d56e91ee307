"""Timing in ToMe's convention: random input, eval mode, no grad, warm-up runs thrown away, images per second at a
stated batch size and dtype. Every speed figure of the project is a ratio of two such measurements taken in one run."""
import statistics
import time

import torch


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def throughput(model, input_size=(3, 224, 224), batch_size=64, device='cpu', dtype=torch.float32, runs=20,
               warmup=5, forward=None, inputs=None):
    """Images per second of `forward(model, x)` (default `model(x)`). `inputs` replaces the random batch (for
    data-dependent models, whose speed depends on the images)."""
    device = torch.device(device)
    model = model.eval().to(device)
    x = inputs if inputs is not None else torch.randn(batch_size, *input_size)
    run = forward or (lambda m, t: m(t))
    return interleaved_throughput({'model': lambda t: run(model, t)}, x.to(device), rounds=1, runs=runs,
                                  warmup=warmup, dtype=dtype)['model']


@torch.no_grad()
def interleaved_seconds(forwards, inputs, rounds=5, runs=4, warmup=2, dtype=torch.float32):
    """Seconds per call of several forwards on the same batch, timed in alternation: `rounds` rounds, each running
    every forward `runs` times in turn. A machine whose speed drifts (a shared VM, clocks, another process) then
    shifts every forward alike instead of whichever was timed last.

    forwards: {name: fn(x)}; returns {name: [seconds per call, one per round]}."""
    device = inputs.device
    x = inputs.to(dtype=dtype) if inputs.is_floating_point() else inputs
    seconds = {name: [] for name in forwards}
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for fn in forwards.values():
            for _ in range(warmup):
                fn(x)
        for _ in range(rounds):
            for name, fn in forwards.items():
                _sync(device)
                start = time.perf_counter()
                for _ in range(runs):
                    fn(x)
                _sync(device)
                seconds[name].append((time.perf_counter() - start) / runs)
    return seconds


def interleaved_throughput(forwards, inputs, rounds=5, runs=4, warmup=2, dtype=torch.float32):
    """Images per second of the median round of `interleaved_seconds`; returns {name: img/s}."""
    seconds = interleaved_seconds(forwards, inputs, rounds, runs, warmup, dtype)
    return {name: inputs.shape[0] / statistics.median(t) for name, t in seconds.items()}


def _spread(values):
    values = sorted(values)
    q1, _, q3 = statistics.quantiles(values, n=4, method='inclusive') if len(values) > 1 else values * 3
    return {'median': statistics.median(values), 'min': values[0], 'max': values[-1], 'q1': q1, 'q3': q3}


def speedup_table(seconds, batch_size, baseline):
    """Per forward of `interleaved_seconds`' result: images/s and speed-up over `baseline`, each as the median,
    min, max and quartiles over the rounds. A round's speed-up divides that round's two timings, taken moments
    apart, so the drift between rounds cancels out of it.

    Returns {name: {'img_per_s': spread, 'speedup': spread}}, a spread being {median, min, max, q1, q3}."""
    base = seconds[baseline]
    return {name: {'img_per_s': _spread([batch_size / s for s in t]),
                   'speedup': _spread([b / s for b, s in zip(base, t)])}
            for name, t in seconds.items()}


def format_spread(spread, digits=2):
    """'median [min, max]' of a `speedup_table` entry."""
    return f"{spread['median']:.{digits}f} [{spread['min']:.{digits}f}, {spread['max']:.{digits}f}]"


def latency_ms(model, input_size=(3, 224, 224), **kwargs):
    """Mean batch-1 latency in milliseconds."""
    return 1000.0 / throughput(model, input_size, batch_size=1, **kwargs)


class _LiveTensorBytes:
    """Peak bytes of the tensors an operation sequence creates, tracked through torch's dispatcher (the CPU has no
    allocator statistics). Inputs and parameters that existed before are not counted."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._storages = {}

    def _release(self, key):
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def track(self, tensor):
        import weakref
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        if key in self._storages:
            self._storages[key][1] += 1
        else:
            self._storages[key] = [storage.nbytes(), 1]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, key)


def peak_forward_memory_mb(fn, device):
    """Peak memory of the tensors created while running fn(), in MiB: CUDA's allocator peak on a GPU, the dispatcher
    tracker on the CPU."""
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    tracker = _LiveTensorBytes()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    tracker.track(t)
            return out

    with torch.no_grad(), Mode():
        fn()
    return tracker.peak / 2 ** 20


# ------------------------------------------------------------------------------------------------- compiled forwards
def add_compile_args(parser):
    """--compile / --compile-backend of a method's benchmark (tools/benchmark.py --method M)."""
    parser.add_argument('--compile', action='store_true',
                        help='also time every forward torch.compile\'d (static shapes) in the same rounds, and report '
                             'each against the compiled baseline and against the eager one')
    parser.add_argument('--compile-backend', default='inductor', help='torch.compile backend (default inductor)')


def compile_forward(fn, backend='inductor', dynamo_config=None):
    """torch.compile of fn with static shapes (each batch size and dtype its own graph, as deployed); `dynamo_config`
    is patched into dynamo around every call, so that it is in force whenever a call traces."""
    compiled = torch.compile(fn, backend=backend, dynamic=False)
    if not dynamo_config:
        return compiled

    def run(x):
        with torch._dynamo.config.patch(**dynamo_config):
            return compiled(x)
    return run


def seconds_with_compiled(forwards, inputs, args, baseline, dynamo_config=None, **timing):
    """`interleaved_seconds` of `forwards`, and with `args.compile` of their compiled versions in the same rounds.

    Returns (the eager forwards' seconds, the compiled report or None). The report, per name: images/s, speed-up
    over the compiled baseline and speed-up over the eager baseline, each a spread over rounds; it is also printed."""
    if not getattr(args, 'compile', False):
        return interleaved_seconds(forwards, inputs, **timing), None
    # one graph per forward, batch size and dtype: keep them all rather than fall back to eager past dynamo's limit
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(forwards))
    timed = dict(forwards)
    timed.update({('compiled', name): compile_forward(fn, args.compile_backend, dynamo_config)
                  for name, fn in forwards.items()})
    seconds = interleaved_seconds(timed, inputs, **timing)
    batch = inputs.shape[0]
    over_compiled = speedup_table(seconds, batch, ('compiled', baseline))
    over_eager = speedup_table(seconds, batch, baseline)
    report = {name: {'img_per_s': over_compiled[('compiled', name)]['img_per_s'],
                     'speedup': over_compiled[('compiled', name)]['speedup'],
                     'speedup_vs_eager_baseline': over_eager[('compiled', name)]['speedup']} for name in forwards}
    print(f'compiled ({args.compile_backend}, static shapes), batch {batch}; median [min, max] over rounds:')
    print(f'{"forward":>20} {"img/s":>26} {"vs compiled " + str(baseline):>24} {"vs eager " + str(baseline):>24}')
    for name, row in report.items():
        print(f'{str(name):>20} {format_spread(row["img_per_s"], 1):>26} {format_spread(row["speedup"]):>24} '
              f'{format_spread(row["speedup_vs_eager_baseline"]):>24}')
    return {name: seconds[name] for name in forwards}, report
