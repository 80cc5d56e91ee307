"""`--method NAME` -> the method's measure hook module, for tools/flops.py and tools/benchmark.py.

The names and modules come from the one registry, shared/methods.py.
"""
import importlib

from shared.methods import METHODS


def measure_module(method):
    if method not in METHODS:
        raise SystemExit(f"unknown method '{method}'; known methods: {', '.join(sorted(METHODS))}")
    module = METHODS[method].measure
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise SystemExit(f"method '{method}' has no measure hooks yet ({module}: {e})")
