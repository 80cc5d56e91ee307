"""ToE measure hooks: per-stage GFLOPs follow the kept-token counts; the benchmark runs and reports every stage."""
import argparse

import pytest
import torch

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
                                              '--rounds', '3', '--warmup', '0', '--device', 'cpu'])
    out = measure.benchmark(args)
    assert [r['kept_tokens'] for r in out['stages']] == [32, 48, 64]
    # the last stage keeps every token: its row is ToE's model with selection off, timed against plain timm
    assert out['stages'][-1]['step_s'] == out['toe_all_tokens_step_s']
    assert out['stages'][0]['select_s'] > 0 and out['stages'][-1]['select_s'] == 0.0
    for row in out['stages']:
        spread = row['speedup_spread']
        assert spread['min'] <= spread['median'] == row['speedup'] <= spread['max']
    expected = 300 * out['full_step_s'] / sum(100 * r['step_s'] for r in out['stages'])
    assert out['schedule_speedup'] == pytest.approx(expected)


def test_plain_baseline_is_timm_with_the_same_weights():
    from timm.models.vision_transformer import VisionTransformer
    args = _args(measure.add_benchmark_args, ['--model', 'vit_digits_patch4_32', '--input-size', '32',
                                              '--num-classes', '10'])
    torch.manual_seed(0)
    model = measure._build(args).eval()
    plain = measure.plain_timm_model(model)
    assert type(plain) is VisionTransformer and not hasattr(plain, 'token_select')
    x = torch.randn(2, 3, 32, 32)
    model.token_select.sparse_inference = False
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
