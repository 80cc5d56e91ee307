"""`tools/benchmark.py --all` on the CPU: the reduced grid writes one Markdown and one CSV table, a row per method,
with the device line; the FLOPs ratio is the methods' own analytic count."""
import csv

import torch

from tools.benchmark import main


def test_smoke_grid_writes_both_tables(tmp_path):
    main(['--all', '--device', 'cpu', '--out', str(tmp_path)])
    md = (tmp_path / 'bench.md').read_text().splitlines()
    lines = (tmp_path / 'bench.csv').read_text().splitlines()
    assert md[0].startswith('Device: CPU') and f'torch {torch.__version__}' in md[0]
    assert lines[0] == '# ' + md[0]
    rows = list(csv.DictReader(lines[1:]))
    assert sorted(r['method'] for r in rows) == ['avit', 'diffrate', 'tavt', 'tome']
    assert {(r['mode'], r['dtype'], r['batch']) for r in rows} == {('eager', 'float32', '1')}
    assert sum(1 for line in md if line.startswith('| ') and 'eager' in line) == 4
    from tavt.measure import gene_macs, parse_gene
    from tavt.models.modeling import build_model
    model = build_model('ViT-digits', 32, 200, zero_head=False)
    gene = parse_gene('lower', model.num_tokens, model.num_layers)
    tavt = next(r for r in rows if r['method'] == 'tavt')
    assert float(tavt['flops_ratio']) == gene_macs(model, None) / gene_macs(model, gene)
    for r in rows:  # one round: the speed-up is that round's ratio of the two img/s
        assert abs(float(r['speedup']) - float(r['img_s']) / float(r['baseline_img_s'])) < 1e-9 * float(r['speedup'])
