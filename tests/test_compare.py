"""tools/compare.py: registry, report fields, numbers equal to the method's own evaluation, bad inputs."""
import csv
import json
import sys
import types

import pytest
import torch

from shared.compare_api import MissingArtefact, Variant
from shared.models import create_model
from shared import methods as registry
from tools import compare
from tools._dispatch import measure_module


@pytest.fixture
def baseline(tmp_path):
    torch.manual_seed(0)
    model = create_model('vit_digits_patch4_32')
    path = tmp_path / 'baseline.pth'
    torch.save({'model': model.state_dict()}, path)
    return path


def _fake_hook(monkeypatch):
    """A method whose variants are the baseline with fewer blocks: its own evaluation is a plain forward."""
    mod = types.ModuleType('fake_compare_hook')
    mod.METHODS = ('fake',)

    def add_args(parser):
        parser.add_argument('--fake-depths', type=int, nargs='+', default=[1])

    def variants(method, ctx, args):
        from shared.compare_api import load_base_model
        out = []
        for d in args.fake_depths:
            m = load_base_model(ctx)
            m.blocks = m.blocks[:d]
            out.append(Variant(method='fake', label=f'depth={d}', settings={'depth': d}, model=m, gflops=0.001 * d,
                               artefacts={'baseline': ctx.base_checkpoint}))
        return out

    mod.add_args, mod.variants = add_args, variants
    monkeypatch.setitem(sys.modules, 'fake_compare_hook', mod)
    monkeypatch.setitem(registry.METHODS, 'fake',
                        registry.Method('fake', 'Fake', '-', 'fake_compare_hook', '-', 'inference', 'x', 'gray'))
    return mod


def test_registry_covers_the_five_methods():
    assert set(registry.METHODS) == set(compare.DEFAULT_METHODS) == {'tome', 'tocom', 'diffrate', 'avit', 'tavt', 'toe'}
    assert registry.of_kind('training') == ('toe',)
    # every hook module the registry names exists, and provides the names it is registered under
    for name, method in registry.METHODS.items():
        assert name in compare.hook_module(name).METHODS
        assert registry.measure_hook(name).__name__ == method.measure == measure_module(name).__name__
    styles = [registry.style(n) for n in (*registry.NAMES, 'baseline')]
    assert len(set(styles)) == len(styles)  # one marker and colour per method


def test_tiny_sweep_writes_every_field_and_matches_own_evaluation(tmp_path, baseline, monkeypatch, capsys):
    _fake_hook(monkeypatch)
    out = tmp_path / 'out'
    rows = compare.main(['--methods', 'fake', '--fake-depths', '1', '2', '--checkpoint', str(baseline),
                         '--output-dir', str(out), '--cache-dir', str(tmp_path / 'cache'), '--quick',
                         '--throughput-batch', '8'])
    assert [r['label'] for r in rows] == ['full', 'depth=1', 'depth=2']
    data = json.loads((out / 'results.json').read_text())['rows']
    with open(out / 'results.csv') as f:
        csv_rows = list(csv.DictReader(f))
    assert len(data) == len(csv_rows) == 3
    for r in data + csv_rows:
        assert set(compare.FIELDS) <= set(r)
    assert data[1]['weights']['baseline']['sha256'] == compare.sha256(baseline)
    assert (out / 'acc_vs_gflops.png').stat().st_size > 1000 and (out / 'acc_vs_throughput.png').exists()
    # the table's accuracy equals an independent evaluation of the same model on the same images
    from shared.datasets import build_dataset
    import argparse
    ds, _ = build_dataset(False, argparse.Namespace(data_set='DIGITS', data_path='', input_size=32,
                                                    eval_crop_ratio=1.0))
    model = create_model('vit_digits_patch4_32')
    model.load_state_dict(torch.load(baseline)['model'])
    model.blocks = model.blocks[:1]
    model.eval()
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor([ds[i][1] for i in range(len(ds))])
        acc = (model(x).argmax(-1) == y).float().mean().item() * 100
    assert data[1]['acc1'] == pytest.approx(acc, abs=1e-3)
    assert 'depth=2' in capsys.readouterr().out


def test_unknown_method_names_the_known_ones():
    with pytest.raises(SystemExit, match='known methods: avit, diffrate'):
        compare.main(['--methods', 'nope'])


def test_missing_artefact_says_which_file_and_command(tmp_path, baseline, monkeypatch):
    mod = _fake_hook(monkeypatch)

    def variants(method, ctx, args):
        raise MissingArtefact('fake compensator', '/nowhere/c.pth', 'python fake/main.py --make-it')

    monkeypatch.setattr(mod, 'variants', variants)
    with pytest.raises(SystemExit, match=r'/nowhere/c.pth; make it with: python fake/main.py --make-it'):
        compare.main(['--methods', 'fake', '--checkpoint', str(baseline), '--output-dir', str(tmp_path)])
    with pytest.raises(SystemExit, match='baseline checkpoint not found'):
        compare.main(['--methods', 'fake', '--checkpoint', str(tmp_path / 'none.pth')])


def test_pareto_front():
    rows = [{'x': 1, 'acc1': 50}, {'x': 2, 'acc1': 40}, {'x': 3, 'acc1': 70}, {'x': 4, 'acc1': 60}]
    assert [r['x'] for r in compare.pareto_front(rows, 'x', 'acc1', True)] == [1, 3]


def test_missing_compensator_names_the_file_and_the_pretraining_command(tmp_path, baseline):
    with pytest.raises(SystemExit, match=r'ToCom compensator not found at /no/comp.pth; make it with: python '
                                         r'tocom/main.py --r_src -1'):
        compare.main(['--methods', 'tocom', '--checkpoint', str(baseline), '--tocom-path', '/no/comp.pth',
                      '--output-dir', str(tmp_path), '--cache-dir', str(tmp_path / 'cache')])
