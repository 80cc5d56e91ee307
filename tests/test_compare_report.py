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
