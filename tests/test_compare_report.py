"""tools/compare.py's report: what reaches the rows (extra), provenance, timing spread, progress lines."""
import csv
import json
import sys
import types

import pytest
import torch

from shared.compare_api import Variant, load_base_model
from shared import methods as registry
from tools import compare


def _hook(monkeypatch, make):
    """Register a method 'fake' whose variants(ctx, args) are `make(ctx)`."""
    mod = types.ModuleType('fake_report_hook')
    mod.METHODS = ('fake',)
    mod.variants = lambda method, ctx, args: make(ctx)
    monkeypatch.setitem(sys.modules, 'fake_report_hook', mod)
    monkeypatch.setitem(registry.METHODS, 'fake',
                        registry.Method('fake', 'Fake', '-', 'fake_report_hook', '-', 'inference', 'x', 'gray'))


def _run(tmp_path, compare_ctx, *extra_argv):
    out = tmp_path / 'out'
    rows = compare.main(['--methods', 'fake', '--checkpoint', compare_ctx.base_checkpoint, '--output-dir', str(out),
                         '--cache-dir', compare_ctx.cache_dir, '--quick', '--throughput-batch', '4', '--no-plots',
                         *extra_argv])
    report = json.loads((out / 'results.json').read_text())
    with open(out / 'results.csv') as f:
        csv_rows = list(csv.DictReader(line for line in f if not line.startswith('#')))
    return rows, report, csv_rows, out


def _shallow(ctx, depth=1):
    model = load_base_model(ctx)
    model.blocks = model.blocks[:depth]
    return model


def test_extra_of_a_variant_reaches_json_and_csv(tmp_path, compare_ctx, monkeypatch):
    figures = {'train_speedup_vs_full_tokens': 1.374, 'epoch_train_time_s': [2.5, 1.25]}
    _hook(monkeypatch, lambda ctx: [Variant('fake', 'e', {}, _shallow(ctx), gflops=0.001, extra=figures)])
    rows, report, csv_rows, _ = _run(tmp_path, compare_ctx)
    assert report['rows'][1]['extra'] == figures
    assert json.loads(csv_rows[1]['extra']) == figures
    assert report['rows'][0]['extra'] == {}  # the baseline reports none


def test_provenance_in_json_and_csv(tmp_path, compare_ctx, monkeypatch):
    import platform
    import subprocess

    import timm
    _hook(monkeypatch, lambda ctx: [Variant('fake', 'd1', {}, _shallow(ctx), gflops=0.001)])
    _, report, csv_rows, _ = _run(tmp_path, compare_ctx, '--batch-size', '64')
    prov = report['provenance']
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=compare.ROOT, stdout=subprocess.PIPE, text=True)
    expected_commit = head.stdout.strip() if head.returncode == 0 else 'unknown'
    assert prov['git_commit'].split('+')[0] == expected_commit
    assert prov['python'] == platform.python_version()
    assert prov['torch'] == torch.__version__ and prov['timm'] == timm.__version__
    assert prov['device'] == 'cpu' and prov['device_name'] and prov['device_name'] != 'unknown'
    assert prov['torch_threads'] == torch.get_num_threads()
    assert prov['dtype'] == 'float32' and prov['eval_batch_size'] == 64 and prov['throughput_batch'] == 4
    for row in csv_rows:
        for key, value in prov.items():
            assert row[f'prov_{key}'] == str(value)


def test_git_commit_outside_a_checkout_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, 'ROOT', str(tmp_path))
    monkeypatch.setenv('GIT_CEILING_DIRECTORIES', str(tmp_path.parent))
    assert compare.git_commit() == 'unknown'


def test_spread_is_wide_compares_range_to_median():
    assert compare.spread_is_wide({'median': 100.0, 'min': 85.0, 'max': 106.0}, 0.2) is True   # 21 % range
    assert compare.spread_is_wide({'median': 100.0, 'min': 90.0, 'max': 109.0}, 0.2) is False  # 19 % range


@pytest.fixture
def drifting_clock(monkeypatch):
    """shared.benchmark's clock made deterministic: each whole-ViT forward costs (blocks x images) units, and the
    machine slows down by 1 % per forward (a drifting shared machine). Timing one point after the other would then
    separate two identical models; timing them interleaved must not."""
    from shared import benchmark
    clock = {'now': 0.0, 'calls': 0}

    def advance(module, inputs):
        if hasattr(module, 'blocks') and hasattr(module, 'patch_embed'):
            clock['calls'] += 1
            clock['now'] += len(module.blocks) * inputs[0].shape[0] * 1e-3 * (1 + 0.01 * clock['calls'])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(advance)
    monkeypatch.setattr(benchmark, 'time', types.SimpleNamespace(perf_counter=lambda: clock['now']))
    yield clock
    handle.remove()


def test_same_model_twice_medians_within_each_others_spread(tmp_path, compare_ctx, monkeypatch, drifting_clock):
    def make(ctx):
        model = _shallow(ctx, depth=2)
        return [Variant('fake', 'a', {}, model, gflops=0.002), Variant('fake', 'b', {}, model, gflops=0.002)]
    _hook(monkeypatch, make)
    rows, report, csv_rows, _ = _run(tmp_path, compare_ctx)
    a, b = rows[1], rows[2]
    for x, y in ((a, b), (b, a)):
        assert x['img_per_s_min'] <= y['img_per_s'] <= x['img_per_s_max']
        assert x['latency_ms_min'] <= y['latency_ms'] <= x['latency_ms_max']
    for r in rows:  # every figure of the row is consistent with its own spread
        assert r['img_per_s_min'] <= r['img_per_s_q1'] <= r['img_per_s'] <= r['img_per_s_q3'] <= r['img_per_s_max']
        wide = (r['img_per_s_max'] - r['img_per_s_min']) / r['img_per_s'] > 0.2
        assert r['spread_wide'] == wide
    # 2 blocks of the baseline's 12 at the same drift: a speed-up of 6 within the drift of a round
    assert a['speedup'] == pytest.approx(6.0, rel=0.05)
    assert csv_rows[1]['spread_wide'] in ('True', 'False')


def test_progress_names_each_method_start_end_and_the_files(tmp_path, compare_ctx, monkeypatch, capsys):
    import re
    _hook(monkeypatch, lambda ctx: [Variant('fake', 'd1', {}, _shallow(ctx), gflops=0.001)])
    _, _, _, out = _run(tmp_path, compare_ctx)
    lines = capsys.readouterr().out.splitlines()
    start = lines.index('| fake: start')
    end = next(i for i, line in enumerate(lines) if re.fullmatch(r'\| fake: done, 1 point\(s\) in \d+\.\d s', line))
    assert start < end
    listed = lines[lines.index('| results written to:') + 1:]
    evaluated = [line for line in lines if line.startswith('| evaluated ')]
    assert [line.split(':')[0] for line in evaluated] == ['| evaluated [1/2] baseline full',
                                                           '| evaluated [2/2] fake d1']
    for size in (4, 1):  # each timing loop names its points as it warms them up, then its duration
        first = lines.index(f'| timing 2 points at batch {size}: 3 rounds x {1 if size == 4 else 2} runs each, '
                            'interleaved')
        assert lines[first + 1:first + 3] == ['|   warm-up [1/2] baseline full', '|   warm-up [2/2] fake d1']
        assert re.fullmatch(rf'\| timing at batch {size} done in \d+\.\d s', lines[first + 3])
    phases = next(line for line in lines if line.startswith('| time per phase: '))
    assert re.fullmatch(r'\| time per phase: baseline [\d.]+ s, derive fake [\d.]+ s, evaluate [\d.]+ s, '
                        r'timing [\d.]+ s, reports [\d.]+ s, total [\d.]+ s', phases)
    report = json.loads((out / 'results.json').read_text())
    assert set(report['phases_s']) == {'baseline', 'derive fake', 'evaluate', 'timing', 'total'}
    names = ('results.txt', 'results.csv', 'training.csv', 'results.json')
    assert [line.strip('| ').strip() for line in listed] == [str(out / n) for n in names]
    assert all((out / n).is_file() for n in names)
