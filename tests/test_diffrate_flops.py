"""DiffRate's FLOPs formula pinned on every shipped schedule, and the tools/flops.py hook."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from diffrate import schedules
from diffrate.flops import caformer_gflops, vit_gflops, vit_training_gflops
from diffrate.measure import schedule_gflops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# spec section 8.1: the formula's value of every schedule in compression_rate.json, 3 decimals
EXPECTED = {
    'vit_deit_tiny_patch16_224': {'0.6': 0.655, '0.7': 0.727, '0.8': 0.809, '0.9': 0.902, '1.0': 1.004},
    'vit_deit_small_patch16_224': {'2.3': 2.327, '2.5': 2.505, '2.7': 2.709, '2.9': 2.905, '3.1': 3.108},
    'vit_deit_base_patch16_224': {'8.7': 8.731, '10.0': 9.986, '10.4': 10.434, '11.5': 11.517, '12.5': 12.523},
    'vit_base_patch16_mae': {'8.7': 8.711, '10.0': 10.003, '10.4': 10.419, '11.5': 11.517},
    'vit_large_patch16_mae': {'31.0': 31.005, '34.7': 34.692, '38.5': 38.481, '42.3': 42.290, '46.1': 46.083},
    'vit_huge_patch14_mae': {'83.7': 83.647, '93.2': 92.107, '103.4': 103.337, '124.5': 124.388},
    'caformer_s36': {'5.2': 5.215, '5.6': 5.604, '6.0': 5.995},
}


def test_shipped_file_is_the_reference_table():
    with open(schedules.SHIPPED_PATH, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == '2a5b4722543ad8dddac642bc411f2c15fef83b9dc6fba9c07a9eea0c8ecd878d'


def test_every_schedule_reproduces_the_formula():
    seen = 0
    for model, key, prune, merge in schedules.all_schedules(schedules.SHIPPED_PATH):
        assert f'{schedule_gflops(model, prune, merge):.3f}' == f'{EXPECTED[model][key]:.3f}', (model, key)
        seen += 1
    assert seen == 31 == sum(len(v) for v in EXPECTED.values())


@pytest.mark.parametrize('model,gflops', [
    ('vit_deit_tiny_patch16_224', 1.2538), ('vit_deit_small_patch16_224', 4.5992), ('vit_deit_base_patch16_224', 17.5644),
    ('vit_base_patch16_mae', 17.5644), ('vit_large_patch16_mae', 61.5555), ('vit_huge_patch14_mae', 167.2959),
    ('caformer_s36', 7.9726)])
def test_uncompressed_models(model, gflops):
    # 4 decimals as in spec 5: MAE-L is 61.555499 (the reference's fp32 sum prints 61.555 too; "61.556" is 61.5555
    # rounded twice)
    assert schedule_gflops(model, None, None) == pytest.approx(gflops, abs=5e-5)


def test_hundred_class_head_as_in_the_issue_tracker():
    # OpenGVLab/DiffRate#2 logs flops 11.5166 for DeiT-B 11.5 with a 100-class head
    prune, merge = schedules.lookup('vit_deit_base_patch16_224', 11.5, schedules.SHIPPED_PATH)
    assert schedule_gflops('vit_deit_base_patch16_224', prune, merge, num_classes=100) == pytest.approx(11.51655, abs=1e-5)


def test_running_min_makes_non_monotone_schedules_harmless():
    # a number that goes up again does not bring tokens back
    down = vit_gflops(384, 16, 196, 1000, [197, 100, 50, 50], [197, 100, 50, 50])
    up = vit_gflops(384, 16, 196, 1000, [197, 100, 50, 150], [197, 100, 50, 150])
    assert down == up


def test_training_gflops_value_and_straight_through_gradient():
    C, depth = 384, 4
    prune = [torch.tensor(v, requires_grad=True) for v in (197., 120., 80., 40.)]
    merge = [torch.tensor(v, requires_grad=True) for v in (197., 100., 90., 30.)]
    g = vit_training_gflops(C, 16, 196, 1000, prune, merge)
    assert g.item() == pytest.approx(vit_gflops(C, 16, 196, 1000, [197, 120, 80, 40], [197, 100, 90, 30]), rel=1e-6)
    g.backward()
    # dF/dk_i = 8C^2 (this block's MLP) + 4C^2 + 4 N_{i+1} C (next block's attention), to prune AND merge alike,
    # nothing further down the network
    tokens_after = [197, 100, 80, 30]
    for i in range(depth):
        expected = 8 * C * C + (4 * C * C + 4 * tokens_after[i] * C if i + 1 < depth else 0)
        assert prune[i].grad.item() * 1e9 == pytest.approx(expected, rel=1e-5)
        assert merge[i].grad.item() * 1e9 == pytest.approx(expected, rel=1e-5)


def test_caformer_formula_counts_merge_only():
    full = caformer_gflops((64, 128, 320, 512), (3, 12, 18, 3), 1000, [196] * 18 + [49] * 3)
    assert round(full, 4) == 7.9726


def test_tools_flops_prints_the_schedule():
    out = subprocess.run([sys.executable, 'tools/flops.py', '--method', 'diffrate', '--model', 'vit_deit_small_patch16_224',
                          '--target_flops', '2.9'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == 'GFLOPs=2.905'


def test_absent_pair_names_the_pairs_that_exist():
    with pytest.raises(schedules.ScheduleNotFoundError) as err:
        schedules.lookup('vit_deit_small_patch16_224', 2.8, schedules.SHIPPED_PATH)
    msg = str(err.value)
    assert 'ViT-S-DeiT' in msg and '2.8' in msg and "'2.9'" in msg and 'CAFormer-S36' in msg


def test_written_entry_reads_back(tmp_path):
    path = str(tmp_path / 'rates.json')
    schedules.write_entry(path, 'vit_deit_tiny_patch16_224', 0.95, [197, 150, 100], [197, 120, 90])
    with open(path) as f:
        assert json.load(f)['ViT-T-DeiT']['0.95'] == {'prune_kept_num': '[197,150,100]',
                                                      'merge_kept_num': '[197,120,90]'}
    assert schedules.lookup('vit_deit_tiny_patch16_224', 0.95, path) == ([197, 150, 100], [197, 120, 90])
