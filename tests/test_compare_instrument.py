"""tools/compare.py as an instrument: the per-image GFLOPs spread, the training-time table, the plots' label layout,
any timm ViT as the backbone, and the preset wiring. Each figure is checked against an independent computation."""
import argparse
import csv
import json
import sys
import types

import numpy as np
import pytest
import torch

from shared import methods as registry
from shared.compare_api import Variant, load_base_model
from tools import compare
from tools.label_layout import Box, any_overlap, place_labels


def _register(monkeypatch, make, kind='inference'):
    """A method 'fake' of `kind` whose variants are `make(ctx)`."""
    mod = types.ModuleType('fake_instrument_hook')
    mod.METHODS = ('fake',)
    mod.variants = lambda method, ctx, args: make(ctx)
    monkeypatch.setitem(sys.modules, 'fake_instrument_hook', mod)
    monkeypatch.setitem(registry.METHODS, 'fake', registry.Method('fake', 'Fake', '-', 'fake_instrument_hook', '-',
                                                                  kind, 'x', 'tab:cyan'))


def _run(tmp_path, compare_ctx, *argv):
    out = tmp_path / 'out'
    rows = compare.main(['--methods', 'fake', '--checkpoint', compare_ctx.base_checkpoint, '--output-dir', str(out),
                         '--cache-dir', compare_ctx.cache_dir, '--quick', '--throughput-batch', '4', '--no-plots',
                         *argv])
    return rows, json.loads((out / 'results.json').read_text()), out


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _shallow(ctx, depth=1):
    model = load_base_model(ctx)
    model.blocks = model.blocks[:depth]
    return model


def _image_cost(images):
    """A made-up data-dependent cost: GFLOPs grow with an image's mean intensity (differs image to image)."""
    return 0.01 + 0.02 * images.flatten(1).mean(1).double()


def _digits_val(size=32):
    from shared.datasets import build_dataset
    ds, _ = build_dataset(False, argparse.Namespace(data_set='DIGITS', data_path='', input_size=size,
                                                    eval_crop_ratio=1.0))
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])


def test_gflops_spread_of_a_data_dependent_variant_equals_an_independent_count(tmp_path, compare_ctx, monkeypatch):
    def per_image(model, images):
        return model(images), {'gflops': _image_cost(images)}

    def batch_mean(model, images):
        return model(images), {'gflops': float(_image_cost(images).mean())}

    _register(monkeypatch, lambda ctx: [
        Variant('fake', 'per-image', {}, _shallow(ctx), forward=per_image),
        Variant('fake', 'batch-mean', {}, _shallow(ctx), forward=batch_mean),
        Variant('fake', 'static', {}, _shallow(ctx), gflops=0.0123)])
    rows, report, out = _run(tmp_path, compare_ctx, '--batch-size', '50')
    images, _ = _digits_val()
    cost = _image_cost(images).numpy()
    dyn, mean_of_batches, static = report['rows'][1:]
    assert dyn['gflops_per'] == 'image'
    assert dyn['gflops'] == pytest.approx(cost.mean(), abs=1e-6)
    for key, expected in (('p5', np.percentile(cost, 5)), ('p95', np.percentile(cost, 95)), ('min', cost.min()),
                          ('max', cost.max())):
        assert dyn[f'gflops_{key}'] == pytest.approx(expected, abs=1e-6), key
    assert dyn['gflops_p95'] - dyn['gflops_p5'] > 1e-3  # a real spread, not a degenerate one
    # a batch mean spreads over batches of 50 only: each image carries its batch's mean
    batches = np.concatenate([np.full(len(c), c.mean()) for c in np.array_split(cost, range(50, len(cost), 50))])
    assert mean_of_batches['gflops_per'] == 'batch'
    assert mean_of_batches['gflops_min'] == pytest.approx(batches.min(), abs=1e-6)
    assert mean_of_batches['gflops_max'] == pytest.approx(batches.max(), abs=1e-6)
    # a static model has no spread; the baseline neither
    for row in (static, report['rows'][0]):
        assert row['gflops_per'] == 'static'
        assert row['gflops_p5'] == row['gflops_p95'] == row['gflops_min'] == row['gflops_max'] == row['gflops']
    csv_dyn = _read_csv(out / 'results.csv')[1]
    assert float(csv_dyn['gflops_p95']) == dyn['gflops_p95'] and csv_dyn['gflops_per'] == 'image'
    table = (out / 'results.txt').read_text()
    assert f"[{dyn['gflops_p5']:.4f}, {dyn['gflops_p95']:.4f}]" in table


def test_recorder_passes_a_float_through_unchanged():
    """The engine's arithmetic is untouched: what it receives for a float-reporting forward is that float."""
    recorder = compare.GflopsRecorder(lambda m, x: (x.sum(1), {'gflops': 0.25, 'depth': 3.0}))
    logits, figures = recorder(None, torch.ones(3, 2))
    assert figures == {'gflops': 0.25, 'depth': 3.0} and torch.equal(logits, torch.full((3,), 2.0))
    assert recorder.per == 'batch'
    assert torch.equal(torch.cat(recorder.values), torch.full((3,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match='2 per-image GFLOPs for 3 images'):
        compare.GflopsRecorder(lambda m, x: (x, {'gflops': torch.ones(2)}))(None, torch.ones(3, 2))


TRAINING = {'epochs': 3, 'wall_s_total': 30.0, 'wall_s_per_epoch': 10.0, 'wall_s_per_epoch_min': 9.5,
            'wall_s_per_epoch_max': 10.5, 'acc1': 91.25, 'baseline_wall_s_total': 45.0,
            'baseline_wall_s_per_epoch': 15.0, 'baseline_wall_s_per_epoch_min': 14.0,
            'baseline_wall_s_per_epoch_max': 16.0, 'baseline_acc1': 92.5, 'speedup': 1.5,
            'measured': {'source': 'shipped record', 'device_name': 'Some CPU', 'threads': 2,
                         'git_commit': 'abc123', 'date': '2026-01-01T00:00:00+00:00'},
            'commands': ['python toe/deit/main.py --epochs 3', 'python tools/train_baseline.py --epochs 3'],
            'cpu_s_total': 55.0}


def test_training_method_gets_its_own_table_read_back_from_the_csv(tmp_path, compare_ctx, monkeypatch):
    _register(monkeypatch, lambda ctx: [Variant('fake', 'r=0.5', {'keep': 0.5}, _shallow(ctx, 2), gflops=0.002,
                                                 extra={'training': TRAINING, 'note': 'x'})], kind='training')
    rows, report, out = _run(tmp_path, compare_ctx)
    # not an inference point: only the baseline is timed and plotted
    assert [r['method'] for r in rows] == [r['method'] for r in report['rows']] == ['baseline']
    [row] = report['training_rows']
    for key in compare.TRAINING_RECORD_KEYS:
        assert row[key] == TRAINING[key], key
    for key, value in TRAINING['measured'].items():
        assert row[f'measured_{key}'] == value
    assert row['commands'] == TRAINING['commands'] and row['extra'] == {'note': 'x'}
    # the trained model's top-1 as evaluated here, against an independent evaluation of the same weights
    model = _shallow(compare_ctx, 2).eval()
    images, labels = _digits_val()
    with torch.no_grad():
        expected = (model(images).argmax(-1) == labels).double().mean().item() * 100
    assert row['acc1_evaluated'] == pytest.approx(expected, abs=1e-3)
    [back] = _read_csv(out / 'training.csv')
    assert list(back)[:len(compare.TRAINING_FIELDS)] == compare.TRAINING_FIELDS
    for key in compare.TRAINING_RECORD_KEYS:
        assert float(back[key]) == TRAINING[key], key
    assert back['measured_source'] == 'shipped record' and json.loads(back['commands']) == TRAINING['commands']
    assert back['prov_git_commit'] == report['provenance']['git_commit']
    table = (out / 'results.txt').read_text()
    assert 'training-time methods' in table
    assert 'figures: shipped record (2026-01-01T00:00:00+00:00, Some CPU, 2 thread(s))' in table


def test_training_method_without_record_still_reports_its_accuracy(tmp_path, compare_ctx, monkeypatch, capsys):
    _register(monkeypatch, lambda ctx: [Variant('fake', 'ckpt', {}, _shallow(ctx), extra={'training': None})],
              kind='training')
    _, report, out = _run(tmp_path, compare_ctx)
    [row] = report['training_rows']
    assert row['speedup'] is None and row['acc1_evaluated'] is not None and row['measured_source'] is None
    assert 'no training record' in capsys.readouterr().out
    assert 'figures: no record' in (out / 'results.txt').read_text()


def test_figures_from_says_this_run_or_the_record():
    assert compare.figures_from({'measured_source': 'this run'}) == 'measured by this run'
    assert compare.figures_from({'measured_source': None}) == 'no record'


def test_label_layout_separates_coincident_points():
    points = [(100.0, 100.0)] * 4 + [(104.0, 101.0), (300.0, 50.0)]
    sizes = [(60.0, 10.0)] * 6
    area = Box(0, 0, 400, 200)
    boxes = place_labels(points, sizes, area, marker_radius=5.0)
    assert any_overlap(boxes) == []
    assert all(b.inside(area) for b in boxes)
    for (x, y), b in zip(points, boxes):  # no label covers a marker
        for px, py in points:
            assert b.overlap(Box(px - 5, py - 5, px + 5, py + 5)) == 0
    # a lone point keeps its label right next to it
    assert boxes[-1].x0 - 300.0 < 10 and boxes[-1].y0 < 50 < boxes[-1].y1


def _crowded_rows():
    """ToMe and a ToCom folded at the same r: same GFLOPs, accuracies a hair apart; several near the baseline."""
    rows = []
    for i, (method, label, gflops, acc) in enumerate([
            ('baseline', 'full', 0.045, 98.33), ('tome', 'r=2', 0.0358, 98.61), ('tocom', 'r=2', 0.0358, 98.61),
            ('tome', 'r=3', 0.0314, 97.50), ('tocom', 'r=3', 0.0314, 97.60), ('tome', 'r=4', 0.0271, 97.22),
            ('tocom', 'r=4', 0.0271, 97.22), ('diffrate', 'target=0.03', 0.0300, 97.5),
            ('avit', 'gate=3', 0.0310, 97.4), ('tavt', 'gene@70%', 0.0315, 97.45)]):
        rows.append({'method': method, 'label': label, 'gflops': gflops, 'acc1': acc, 'gflops_per': 'static',
                     'img_per_s': 300.0 + i, 'img_per_s_min': 280.0 + i, 'img_per_s_max': 320.0 + i})
    return rows


PROV = {'data_set': 'DIGITS', 'model': 'vit_digits_patch4_32', 'device_name': 'Some CPU', 'device': 'cpu',
        'dtype': 'float32', 'throughput_batch': 64, 'torch_threads': 2, 'git_commit': '0123456789abcdef+dirty'}


@pytest.mark.parametrize('x_key', ['gflops', 'img_per_s'])
def test_plot_labels_do_not_overlap(x_key):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = _crowded_rows()
    fig = compare.draw_plot(rows, x_key, x_key, x_key == 'gflops', PROV)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text()]
    assert sorted(t.get_text() for t in labels) == sorted(compare.point_label(r) for r in rows)
    # the text's own box (an Annotation's extent would also cover its leader line)
    from matplotlib.text import Text
    boxes = [Box(e.x0, e.y0, e.x1, e.y1) for e in (Text.get_window_extent(t, renderer) for t in labels)]
    assert any_overlap(boxes) == []
    frame = ax.get_window_extent(renderer)
    assert all(b.inside(Box(frame.x0, frame.y0, frame.x1, frame.y1)) for b in boxes)
    # the subtitle names data set, backbone, device, dtype, batch, threads and commit
    assert ax.get_title() == ('DIGITS, vit_digits_patch4_32 | Some CPU (cpu), float32, throughput batch 64, '
                              '2 thread(s) | commit 0123456789ab+dirty')
    plt.close(fig)


def test_any_timm_vit_is_built_from_its_checkpoint(tmp_path, monkeypatch):
    """A DINOv2-registers ViT-S checkpoint made at 518 px with a 10-class head, compared at --input-size 28 on the
    digits: num_classes from the head, img_size from the flag, position embedding resampled by timm."""
    import timm
    from shared.flops import model_macs
    torch.manual_seed(0)
    made = timm.create_model('vit_small_patch14_reg4_dinov2', pretrained=False, num_classes=10)
    ckpt = tmp_path / 'dinov2_s_reg4_digits.pth'
    torch.save({'model': made.state_dict()}, ckpt)
    _register(monkeypatch, lambda ctx: [])
    out = tmp_path / 'out'
    rows = compare.main(['--methods', 'fake', '--model', 'vit_small_patch14_reg4_dinov2', '--checkpoint', str(ckpt),
                         '--input-size', '28', '--output-dir', str(out), '--cache-dir', str(tmp_path / 'cache'),
                         '--quick', '--throughput-batch', '2', '--no-plots', '--batch-size', '120'])
    expected = timm.create_model('vit_small_patch14_reg4_dinov2', pretrained=False, num_classes=10, img_size=28)
    [base] = rows
    assert base['gflops'] == pytest.approx(model_macs(expected) / 1e9, abs=1e-6)
    assert base['params_m'] == round(sum(p.numel() for p in expected.parameters()) / 1e6, 4)
    # the evaluated weights are timm's resampling of the checkpoint's
    from timm.models.vision_transformer import checkpoint_filter_fn
    expected.load_state_dict(checkpoint_filter_fn(made.state_dict(), expected))
    images, labels = _digits_val(28)
    with torch.no_grad():
        acc = (expected.eval()(images).argmax(-1) == labels).double().mean().item() * 100
    assert base['acc1'] == pytest.approx(acc, abs=1e-3)


def test_checkpoint_without_a_head_is_refused(tmp_path, monkeypatch):
    from shared.models import create_model
    state = create_model('vit_digits_patch4_32').state_dict()
    del state['head.weight'], state['head.bias']
    torch.save({'model': state}, tmp_path / 'headless.pth')
    _register(monkeypatch, lambda ctx: [])
    with pytest.raises(SystemExit, match='has no classification head'):
        compare.main(['--methods', 'fake', '--checkpoint', str(tmp_path / 'headless.pth'),
                      '--output-dir', str(tmp_path / 'o'), '--cache-dir', str(tmp_path / 'c')])


def test_preset_refuses_missing_weights_naming_each_file(tmp_path):
    pytest.importorskip('shared.presets')
    (tmp_path / 'weights').mkdir()
    with pytest.raises(SystemExit) as e:
        compare.main(['--preset', 'deit_small_imagenet', '--weights-dir', str(tmp_path / 'weights'),
                      '--data-path', str(tmp_path), '--output-dir', str(tmp_path / 'o')])
    message = str(e.value)
    assert 'deit_small_patch16_224-cd65a155.pth' in message and 'dl.fbaipublicfiles.com' in message


def test_paper_columns_come_from_the_preset(monkeypatch):
    presets = pytest.importorskip('shared.presets')
    seen = []

    def reference(preset, row):
        seen.append((preset, row['method']))
        return {'acc1': 79.4, 'gflops': 2.7, 'source': 'paper', 'note': ''} if row['method'] == 'tome' else None

    monkeypatch.setattr(presets, 'paper_reference', reference)
    assert compare.paper_columns('p', {'method': 'tome'}) == {'paper_acc1': 79.4, 'paper_gflops': 2.7,
                                                              'paper_source': 'paper'}
    assert compare.paper_columns('p', {'method': 'avit'}) == {'paper_acc1': None, 'paper_gflops': None,
                                                              'paper_source': None}
    assert compare.paper_columns(None, {'method': 'tome'})['paper_acc1'] is None
    assert seen == [('p', 'tome'), ('p', 'avit')]
