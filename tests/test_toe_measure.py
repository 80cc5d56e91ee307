"""ToE measure hooks: per-stage GFLOPs follow the kept-token counts; the benchmark runs and reports every stage."""
import argparse

from toe import measure


def _args(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


def test_flops_per_stage_and_schedule():
    args = _args(measure.add_flops_args, ['--model', 'deit_small_patch16_224'])
    weighted = measure.flops(args)
    rows = measure.stage_table(measure._build(args), 300)
    assert [(s, e, k) for s, e, k, _ in rows] == [(1, 100, 98), (2, 100, 147), (3, 100, 196)]
    assert abs(rows[-1][3] - 4.599) < 1e-3 and rows[0][3] < rows[1][3] < rows[2][3]
    assert abs(weighted - sum(g for *_, g in rows) / 3) < 1e-9
    args.stage = 1
    assert measure.flops(args) == rows[0][3]


def test_benchmark_reports_each_stage():
    args = _args(measure.add_benchmark_args, ['--model', 'vit_digits_patch4_32', '--input-size', '32',
                                              '--num-classes', '10', '--batch-size', '4', '--runs', '1',
                                              '--warmup', '0', '--device', 'cpu'])
    out = measure.benchmark(args)
    assert [r['kept_tokens'] for r in out['stages']] == [32, 48, 64]
    assert out['stages'][-1]['speedup'] == 1.0 and out['stages'][0]['select_s'] > 0
    assert out['schedule_speedup'] > 0
