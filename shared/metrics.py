"""Training-loop meters and the progress lines they print.

A `SmoothedValue` keeps the last `window_size` values (median / mean for the progress lines) and weighted running
totals over everything it was given (the epoch average). A `MetricLogger` holds named meters, created on first use,
and `log_every` wraps an iterable to print

    <header>  [ step/total]  eta: h:mm:ss  <name>: <meter>  ...  time: <s/step>  data: <s/step>  [max mem: <MiB>]

every `print_freq` steps and at the last one (fields joined by the logger's delimiter), then
`<header> Total time: h:mm:ss (<s> s / it)`.
"""
import datetime
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist

from shared.distributed import is_dist_avail_and_initialized, _collective_device

DEFAULT_FMT = '{median:.4f} ({global_avg:.4f})'


class _MeterFields:
    """Mapping for str.format_map: a field is computed only when the format asks for it."""

    def __init__(self, meter):
        self.meter = meter

    def __getitem__(self, name):
        if name not in SmoothedValue.fields:
            raise KeyError(name)
        return getattr(self.meter, name)


class SmoothedValue:
    """One scalar series. `update(value, n)` counts `value` as the mean of `n` samples for the global average; the
    window holds each update once."""
    fields = ('median', 'avg', 'global_avg', 'max', 'value')

    def __init__(self, window_size=20, fmt=None):
        self.window = deque(maxlen=window_size)
        self.count = 0
        self.total = 0.0
        self.fmt = fmt or DEFAULT_FMT

    def update(self, value, n=1):
        self.window.append(value)
        self.count, self.total = self.count + n, self.total + value * n

    def synchronize_between_processes(self):
        """Add up count and total over the ranks (one all_reduce); the window stays per rank."""
        if not is_dist_avail_and_initialized():
            return
        count_and_total = torch.tensor([self.count, self.total], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(count_and_total)
        count, total = count_and_total.tolist()
        self.count, self.total = int(count), total

    def _window_tensor(self, dtype=None):
        # Python floats become float32 here (ints int64): the printed median and mean are float32 statistics.
        return torch.tensor(list(self.window), dtype=dtype)

    @property
    def median(self):
        """Lower median of the window (torch's convention for an even count)."""
        return self._window_tensor().median().item()

    @property
    def avg(self):
        return self._window_tensor(torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.window)

    @property
    def value(self):
        return self.window[-1]

    def __str__(self):
        return self.fmt.format_map(_MeterFields(self))


class MetricLogger:
    """Named meters (a `defaultdict` of default SmoothedValues, so `meters[name].update(v, n=...)` creates one),
    readable as attributes: `logger.loss.global_avg`."""

    def __init__(self, delimiter='  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **values):
        """One update per keyword; tensors are read with .item(), None is skipped."""
        for name, value in values.items():
            if value is None:
                continue
            self.meters[name].update(float(value.item() if isinstance(value, torch.Tensor) else value))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __getattr__(self, name):
        # Only reached when normal lookup fails; reading __dict__ keeps copy/pickle (no `meters` yet) from recursing.
        meters = self.__dict__.get('meters', {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def _progress_line(self, header, step, steps, step_time, load_time):
        eta = datetime.timedelta(seconds=int(step_time.global_avg * (steps - step)))
        fields = [header, f'[{step:{len(str(steps))}d}/{steps}]', f'eta: {eta}', str(self), f'time: {step_time}',
                  f'data: {load_time}']
        if torch.cuda.is_available():
            fields.append(f'max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}')
        return self.delimiter.join(fields)

    def log_every(self, iterable, print_freq, header=''):
        """Yield the items of `iterable` (which must have a len), printing progress as described in the module."""
        header = header or ''
        steps = len(iterable)
        step_time = SmoothedValue(fmt='{avg:.4f}')  # from the end of one step to the end of the next
        load_time = SmoothedValue(fmt='{avg:.4f}')  # of which waiting for the next item
        started = step_end = time.time()
        for step, item in enumerate(iterable):
            load_time.update(time.time() - step_end)
            yield item
            step_time.update(time.time() - step_end)
            if step % print_freq == 0 or step == steps - 1:
                print(self._progress_line(header, step, steps, step_time, load_time))
            step_end = time.time()
        elapsed = time.time() - started
        print(f'{header} Total time: {datetime.timedelta(seconds=int(elapsed))} '
              f'({elapsed / max(steps, 1):.4f} s / it)')
