"""tools/flops.py on a data-dependent model (A-ViT): the printed distribution over the images and the kept last line
`GFLOPs=<mean>` equal what the model's own depth counters give, counted here with the MAC formula written out."""
import argparse
import re

import numpy as np
import torch

from avit import measure

ARGV = ['--method', 'avit', '--data-set', 'DIGITS', '--input-size', '32', '--num-images', '10', '--batch-size', '4',
        '--gate_center', '3']


def macs_from_counters(model, counter_token):
    """Each image's MACs from its (N,) depth counters: block l runs on the tokens of depth >= l (1-based);
    patch embedding with the class slot, attention 4·n·C² + 2·n²·C, MLP 2·ratio·n·C², head C·classes."""
    C = model.embed_dim
    patch = model.patch_embed.patch_size[0]
    ratio = model.blocks[0].mlp.fc1.out_features / C
    out = []
    for cnt in counter_token.tolist():
        total = len(cnt) * C * 3 * patch * patch + C * model.num_classes
        for layer in range(1, len(model.blocks) + 1):
            n = sum(1 for d in cnt if d >= layer)
            total += 4 * n * C * C + 2 * n * n * C + 2 * ratio * n * C * C
        out.append(total)
    return out


def reference_gflops():
    """The first 10 DIGITS validation images through the same model, in batches of 4, counted independently."""
    from shared.datasets import build_dataset
    parser = argparse.ArgumentParser()
    measure.add_flops_args(parser)
    args = parser.parse_args(ARGV[2:])
    dataset, nb_classes = build_dataset(is_train=False, args=measure._data_args(args))
    model = measure._build(args, (10., 30.), nb_classes)
    images = torch.stack([dataset[i][0] for i in range(10)])
    per_image = []
    with torch.no_grad():
        for batch in images.split(4):
            model(batch)
            per_image += macs_from_counters(model, model.counter_token)
    return np.array(per_image) / 1e9


def test_printed_distribution_matches_depth_counters(capsys):
    from tools.flops import main
    returned = main(ARGV)
    lines = capsys.readouterr().out.strip().splitlines()
    expected = reference_gflops()
    assert expected.min() < expected.max()  # the images really cost different amounts
    assert abs(returned - expected.mean()) < 1e-12
    assert lines[-1] == f'GFLOPs={expected.mean():.3f}'
    stats = dict(re.findall(r'(mean|p5|p50|p95|min|max) ([0-9.]+)', lines[-2]))
    assert 'over 10 images' in lines[-2]
    want = {'mean': expected.mean(), 'p5': np.percentile(expected, 5), 'p50': np.median(expected),
            'p95': np.percentile(expected, 95), 'min': expected.min(), 'max': expected.max()}
    assert stats == {k: f'{v:.3f}' for k, v in want.items()}


def test_distribution_quantiles():
    from tools.flops import distribution
    values = np.arange(1.0, 102.0)  # 1..101: p5 = 6, p50 = 51, p95 = 96 exactly
    got = distribution(torch.tensor(values))
    assert (got['mean'], got['p5'], got['p50'], got['p95'], got['min'], got['max'], got['images']) == \
        (51.0, 6.0, 51.0, 96.0, 1.0, 101.0, 101)


def test_tavt_says_its_flops_are_fixed_by_the_gene(capsys):
    from tools.flops import main
    gflops = main(['--method', 'tavt', '--model_type', 'ViT-digits', '--img_size', '32', '--config', 'lower'])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2] == f'FLOPs fixed by the gene, the same for every image: {gflops:.3f} GFLOPs per image'
    assert out[-1] == f'GFLOPs={gflops:.3f}'
