"""`tools/benchmark.py --all` on the CPU: the reduced grid writes one Markdown and one CSV table, a row per method of
the registry, headed by the device line; the FLOPs ratio is each method's own analytic count; ToE's pair is the same
computation on both sides; with --compile every pair also gets a compiled row."""
import csv
import math

import pytest
import torch

from shared.methods import NAMES
from tools.bench_grid import PAIRS, speed_columns
from tools.benchmark import main


def read_grid(out_dir):
    md = (out_dir / 'bench.md').read_text().splitlines()
    lines = (out_dir / 'bench.csv').read_text().splitlines()
    assert lines[0] == '# ' + md[0]
    return md, list(csv.DictReader(lines[1:]))


def test_smoke_grid_writes_both_tables(tmp_path):
    main(['--all', '--device', 'cpu', '--out', str(tmp_path)])
    md, rows = read_grid(tmp_path)
    assert md[0].startswith('Device: CPU') and f'torch {torch.__version__}' in md[0]
    assert f'{torch.get_num_threads()} torch threads' in md[0]
    assert tuple(r['method'] for r in rows) == NAMES  # every registered method, in registry order
    assert {(r['mode'], r['dtype'], r['batch']) for r in rows} == {('eager', 'float32', '1')}
    assert sum(1 for line in md if line.startswith('| ') and '| eager |' in line) == len(NAMES)
    from tavt.measure import gene_macs, parse_gene
    from tavt.models.modeling import build_model
    model = build_model('ViT-digits', 32, 200, zero_head=False)
    gene = parse_gene('lower', model.num_tokens, model.num_layers)
    by_method = {r['method']: r for r in rows}
    assert float(by_method['tavt']['flops_ratio']) == gene_macs(model, None) / gene_macs(model, gene)
    assert float(by_method['toe']['flops_ratio']) == 1.0
    # ToMe and folded ToCom merge the same tokens: the same count (deit_tiny at 32 px, r = 2)
    assert by_method['tome']['flops_ratio'] == by_method['tocom']['flops_ratio']
    for r in rows:  # one round: the speed-up is that round's ratio of the two img/s
        assert abs(float(r['speedup']) - float(r['img_s']) / float(r['baseline_img_s'])) < 1e-9 * float(r['speedup'])
        assert r['speedup_vs_eager_baseline'] == r['speedup']  # an eager row's baseline is the eager one
        assert float(r['peak_mb']) > 0 and float(r['baseline_peak_mb']) > 0


def test_toe_pair_is_the_plain_model():
    """ToE's model at inference runs no token selection: its logits are the plain model's, bit for bit."""
    (pair,) = PAIRS['toe'](gpu=False)
    x = torch.randn(2, 3, pair.size, pair.size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(pair.reduced(x), pair.plain(x))


def test_pairs_share_weights():
    """Each plain baseline holds the reduced model's weights: the pairs whose reduction is off by a setting give the
    baseline's logits (ToMe at r = 0)."""
    (pair,) = PAIRS['tome'](gpu=False)
    x = torch.randn(2, 3, pair.size, pair.size, generator=torch.Generator().manual_seed(4))
    pair.module.r = 0
    with torch.no_grad():
        assert torch.allclose(pair.reduced(x), pair.plain(x), atol=1e-5)


def test_speed_columns_compare_each_mode_with_its_baseline():
    """Per-round timings (seconds per call) of the four forwards: the compiled row divides by the compiled baseline
    and, in its own column, by the eager baseline of the same rounds."""
    seconds = {'baseline': [4.0, 8.0, 4.0], 'reduced': [2.0, 2.0, 4.0],
               'compiled baseline': [2.0, 4.0, 1.0], 'compiled reduced': [1.0, 1.0, 0.5]}
    columns = speed_columns(seconds, 8)
    # eager: per-round ratios 2, 4, 1; compiled: 2, 4, 2 over its baseline, 4, 8, 8 over the eager one
    assert columns['eager'] == dict(baseline_img_s=2.0, img_s=4.0, speedup=2.0, speedup_min=1.0, speedup_max=4.0,
                                    speedup_vs_eager_baseline=2.0)
    assert columns['compiled'] == dict(baseline_img_s=4.0, img_s=8.0, speedup=2.0, speedup_min=2.0, speedup_max=4.0,
                                       speedup_vs_eager_baseline=8.0)
    assert list(speed_columns({k: seconds[k] for k in ('baseline', 'reduced')}, 8)) == ['eager']


@pytest.mark.heavy
def test_compiled_rows(tmp_path):
    """--compile (eager backend: dynamo's graphs run as traced) adds a compiled row after each eager row, with the
    same FLOPs and no CPU peak memory (the CPU tracker cannot see inside compiled code)."""
    main(['--all', '--device', 'cpu', '--compile', '--compile-backend', 'eager', '--methods', 'tavt', 'toe',
          '--out', str(tmp_path)])
    md, rows = read_grid(tmp_path)
    assert [(r['method'], r['mode']) for r in rows] == [('tavt', 'eager'), ('tavt', 'compiled'), ('toe', 'eager'),
                                                         ('toe', 'compiled')]
    for eager, comp in (rows[:2], rows[2:]):
        assert comp['flops_ratio'] == eager['flops_ratio'] and comp['setting'] == eager['setting']
        assert math.isnan(float(comp['peak_mb'])) and math.isnan(float(comp['baseline_peak_mb']))
        assert float(eager['peak_mb']) > 0
    table = [line for line in md if line.startswith('| ') and ('| compiled |' in line or '| eager |' in line)]
    assert [line.endswith('| n/a | n/a |') for line in table] == [False, True, False, True]
    assert 'torch.compile\'d (eager, static shapes)' in md[2]
