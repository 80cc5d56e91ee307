"""tools/compare.py's report: what reaches the rows (extra), provenance, timing spread, progress lines."""
import csv
import json
import sys
import types

import pytest
import torch

from shared.compare_api import Variant, load_base_model
from tools import compare


def _hook(monkeypatch, make):
    """Register a method 'fake' whose variants(ctx, args) are `make(ctx)`."""
    mod = types.ModuleType('fake_report_hook')
    mod.METHODS = ('fake',)
    mod.variants = lambda method, ctx, args: make(ctx)
    monkeypatch.setitem(sys.modules, 'fake_report_hook', mod)
    monkeypatch.setitem(compare.METHOD_MODULES, 'fake', 'fake_report_hook')


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
