"""The one list of the project's methods, read by tools/compare.py, tools/flops.py, tools/benchmark.py and
tools/bench_grid.py: a method's name, what it is, where its hooks live, and how the plots draw it.

`kind` says where a method's benefit shows: 'inference' methods make a cheaper model (compared as accuracy vs
GFLOPs / throughput points), 'training' methods make training cheaper and end with a plain model (compared in a
table of training time and accuracy reached, never as an inference point).
"""
import importlib
from dataclasses import dataclass

from shared.errors import UserError


@dataclass(frozen=True)
class Method:
    name: str        # the spelling of --method / --methods
    title: str       # what the plots' legends and the tables call it
    paper: str       # venue and year of the paper it reimplements
    compare: str     # module with METHODS/add_args/variants (the protocol in shared/compare_api.py)
    measure: str     # module with add_flops_args/flops/add_benchmark_args/benchmark (tools/flops.py, benchmark.py)
    kind: str        # 'inference' or 'training'
    marker: str      # matplotlib marker
    color: str       # matplotlib colour


_ALL = (
    Method('tome', 'ToMe', 'ICLR 2023', 'tocom.compare', 'tocom.measure', 'inference', 'o', 'tab:orange'),
    Method('tocom', 'ToCom', 'ECCV 2024', 'tocom.compare', 'tocom.measure', 'inference', 's', 'tab:green'),
    Method('diffrate', 'DiffRate', 'ICCV 2023', 'diffrate.compare', 'diffrate.measure', 'inference', '^', 'tab:red'),
    Method('avit', 'A-ViT', 'CVPR 2022', 'avit.compare', 'avit.measure', 'inference', 'D', 'tab:purple'),
    Method('tavt', 'TAVT', 'DATE 2023', 'tavt.compare', 'tavt.measure', 'inference', 'v', 'tab:brown'),
    Method('toe', 'ToE', 'CVPR 2024', 'toe.compare', 'toe.measure', 'training', 'P', 'tab:pink'),
)
METHODS = {m.name: m for m in _ALL}           # in the order the comparison runs and the tables list them
NAMES = tuple(METHODS)
KINDS = ('inference', 'training')
# how the plots draw the shared starting point of every method
BASELINE_MARKER, BASELINE_COLOR = '*', 'black'


def get(name, flag='--methods'):
    """The registry entry of `name`; an unknown name is a UserError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method '{name}' in {flag}; known methods: {', '.join(sorted(METHODS))}") from None


def of_kind(kind):
    """Names of the methods of one kind, in registry order."""
    if kind not in KINDS:
        raise ValueError(f'kind must be one of {KINDS}, not {kind!r}')
    return tuple(m.name for m in _ALL if m.kind == kind)


def compare_hook(name):
    """The imported compare hook module of a method."""
    return importlib.import_module(get(name).compare)


def measure_hook(name):
    """The imported measure hook module of a method."""
    return importlib.import_module(get(name, '--method').measure)


def style(name):
    """(marker, colour) of a method in the plots; the baseline and names outside the registry get their own."""
    if name in METHODS:
        return METHODS[name].marker, METHODS[name].color
    if name == 'baseline':
        return BASELINE_MARKER, BASELINE_COLOR
    return 'x', 'gray'
