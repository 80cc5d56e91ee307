"""shared.benchmark: per-round timings of interleaved forwards and the speed-up spread computed from them."""
import torch

from shared.benchmark import format_spread, interleaved_seconds, speedup_table


def test_interleaved_seconds_runs_every_forward_in_alternation():
    calls = []
    forwards = {'a': lambda x: calls.append('a'), 'b': lambda x: calls.append('b')}
    seconds = interleaved_seconds(forwards, torch.zeros(2, 3), rounds=3, runs=2, warmup=1)
    assert calls == ['a', 'b'] + ['a', 'a', 'b', 'b'] * 3
    assert [len(t) for t in seconds.values()] == [3, 3] and all(s >= 0 for t in seconds.values() for s in t)


def test_speedup_table_divides_timings_of_the_same_round():
    seconds = {'base': [2.0, 4.0, 3.0, 2.0, 8.0], 'fast': [1.0, 1.0, 1.5, 2.0, 2.0]}
    table = speedup_table(seconds, 8, 'base')
    # per-round ratios 2, 4, 2, 1, 4
    assert table['fast']['speedup'] == {'median': 2.0, 'min': 1.0, 'max': 4.0, 'q1': 2.0, 'q3': 4.0}
    assert table['base']['speedup']['min'] == table['base']['speedup']['max'] == 1.0
    # images/s 8, 8, 16/3, 4, 4
    assert table['fast']['img_per_s'] == {'median': 16 / 3, 'min': 4.0, 'max': 8.0, 'q1': 4.0, 'q3': 8.0}
    assert format_spread(table['fast']['speedup']) == '2.00 [1.00, 4.00]'


def test_seconds_with_compiled_times_a_compiled_copy_of_each_forward():
    """--compile of a method's benchmark: each forward is compiled once (a counting backend sees one graph each, none
    recompiled over the rounds), timed in the same rounds, and reported against the compiled baseline."""
    import types
    from shared.benchmark import seconds_with_compiled
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    forwards = {'base': lambda x: x * 2, 'fast': lambda x: x + 1}
    args = types.SimpleNamespace(compile=True, compile_backend=counting_backend)
    seconds, report = seconds_with_compiled(forwards, torch.ones(4, 3), args, 'base', rounds=3, runs=2, warmup=1)
    assert list(seconds) == ['base', 'fast'] and [len(t) for t in seconds.values()] == [3, 3]
    assert len(graphs) == 2
    assert list(report) == ['base', 'fast']
    assert report['base']['speedup'] == {'median': 1.0, 'min': 1.0, 'max': 1.0, 'q1': 1.0, 'q3': 1.0}
    assert all(len(row['img_per_s']) == 5 and row['speedup_vs_eager_baseline']['median'] > 0
               for row in report.values())
    assert seconds_with_compiled(forwards, torch.ones(4, 3), types.SimpleNamespace(), 'base', rounds=1, runs=1,
                                 warmup=0)[1] is None
    torch._dynamo.reset()
