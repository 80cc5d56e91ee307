"""`--method NAME` -> the method's measure hook module, for tools/flops.py and tools/benchmark.py.

The names and modules come from the one registry, shared/methods.py.
"""
import importlib

from shared.methods import METHODS

# name -> module with add_flops_args/flops/add_benchmark_args/benchmark (see DEVELOPING.md); derived from the
# registry, kept for the callers that spell their --method choices with it
MEASURE_MODULES = {name: method.measure for name, method in METHODS.items()}


def measure_module(method):
    if method not in METHODS:
        raise SystemExit(f"unknown method '{method}'; known methods: {', '.join(sorted(METHODS))}")
    module = METHODS[method].measure
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise SystemExit(f"method '{method}' has no measure hooks yet ({module}: {e})")
