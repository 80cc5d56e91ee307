"""`--method NAME` -> the method's hook module, for tools/flops.py and tools/benchmark.py."""
import importlib

# method name -> module with add_flops_args/flops/add_benchmark_args/benchmark (see DEVELOPING.md)
MEASURE_MODULES = {
    'tome': 'tocom.measure',
    'tocom': 'tocom.measure',
    'diffrate': 'diffrate.measure',
    'avit': 'avit.measure',
    'tavt': 'tavt.measure',
    'toe': 'toe.measure',
}


def measure_module(method):
    if method not in MEASURE_MODULES:
        raise SystemExit(f"unknown method '{method}'; known methods: {', '.join(sorted(MEASURE_MODULES))}")
    try:
        return importlib.import_module(MEASURE_MODULES[method])
    except ModuleNotFoundError as e:
        raise SystemExit(f"method '{method}' has no measure hooks yet ({MEASURE_MODULES[method]}: {e})")
