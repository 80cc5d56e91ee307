"""ONNX export (tools/export.py): each exportable method at fixed settings, run by onnxruntime on the CPU, gives the
eager logits within 1e-4, at the traced batch size and another one (the batch axis is dynamic); the size-weighted
scatter mean exports as sum / count; A-ViT and a missing onnx stop with one `error:` line."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

sys.path.insert(0, os.path.dirname(__file__))
import reduced_models  # noqa: E402

from tools import export  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4
# four blocks keep each export at a few seconds on one core; the schedules are the 12-block ones cut to four
DEPTH = 4


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(['logits'], {'images': x.numpy()})[0])


@pytest.mark.parametrize('method', ['tome', 'tocom_folded', 'diffrate', 'tavt'])
def test_exported_logits_match_eager(method, tmp_path):
    model = reduced_models.BUILDERS[method](depth=DEPTH)
    path = export.export_onnx(model, reduced_models.images(2), tmp_path / f'{method}.onnx')
    for batch in (2, 3):
        x = reduced_models.images(batch, seed=7)
        with torch.no_grad():
            eager = model(x)
        exported = run_onnx(path, x)
        assert exported.shape == eager.shape
        assert (exported - eager).abs().max().item() < TOLERANCE


def test_scatter_mean_exports_as_sum_over_count(tmp_path):
    """DiffRate's merge op: duplicate destinations, the destination itself counted (include_self)."""
    class ScatterMean(torch.nn.Module):
        def forward(self, x):
            index = torch.tensor([[0, 2, 2, 0, 2]]).unsqueeze(-1).expand(x.shape[0], 5, x.shape[-1])
            return x[:, :3].scatter_reduce(1, index, x[:, 3:], reduce='mean')

    x = torch.randn(2, 8, 4)
    path = export.export_onnx(ScatterMean(), x, tmp_path / 'mean.onnx', dynamic_batch=False)
    out = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {'images': x.numpy()})[0])
    expected = torch.stack([(x[:, 0] + x[:, 3] + x[:, 6]) / 3, x[:, 1], (x[:, 2] + x[:, 4] + x[:, 5] + x[:, 7]) / 4], 1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def _cli(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'export.py'), *argv], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_cli_output_matches_the_model_it_was_given(tmp_path):
    model = reduced_models.tome()
    checkpoint = tmp_path / 'weights.pth'
    torch.save({'model': model.state_dict()}, checkpoint)
    out = tmp_path / 'tome.onnx'
    result = _cli('--method', 'tome', '--model', 'vit_digits_patch4_32', '--checkpoint', str(checkpoint),
                  '--num-classes', '10', '--r', str(reduced_models.TOME_R), '--batch-size', '2', str(out))
    assert result.returncode == 0, result.stderr
    x = reduced_models.images(3, seed=3)
    with torch.no_grad():
        eager = model(x)
    assert (run_onnx(out, x) - eager).abs().max().item() < TOLERANCE


def test_cli_refuses_avit_with_one_error_line(tmp_path):
    result = _cli('--method', 'avit', '--model', 'avit_tiny_patch16_224', str(tmp_path / 'a.onnx'))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'data-dependent halting' in lines[0]
    assert not (tmp_path / 'a.onnx').exists()


def test_missing_onnx_is_one_error_line(monkeypatch, capsys, tmp_path):
    from shared.errors import run_cli
    monkeypatch.setitem(sys.modules, 'onnx', None)  # import onnx now raises ImportError
    with pytest.raises(SystemExit) as stop:
        run_cli(export.main, ['--method', 'tome', '--model', 'vit_digits_patch4_32', str(tmp_path / 'x.onnx')])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: ONNX export needs the onnx package: pip install '.[export]'"]


def test_parser_takes_no_abbreviations():
    parser = export.get_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(['--meth', 'tome', '--model', 'm', 'out.onnx'])
    assert parser.parse_args(['--method', 'tome', '--model', 'm', 'out.onnx']).method == 'tome'
