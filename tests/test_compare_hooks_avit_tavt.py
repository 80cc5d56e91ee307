"""avit.compare and tavt.compare: shipped artefacts (used by default, ignored otherwise, never written, hashes as
their READMEs say), A-ViT's per-image GFLOPs, --avit-checkpoint, and training logs that name the variant."""
import argparse
import hashlib
import os
import re

import pytest
import torch

from avit import compare as avit_hook
from shared.compare_api import MissingArtefact, data_args, load_base_model
from shared.datasets import build_dataset
from shared.flops import model_macs
from tavt import compare as tavt_hook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, 'shared', 'assets', 'compare')


def hook_args(hook, *argv):
    parser = argparse.ArgumentParser()
    hook.add_args(parser)
    return parser.parse_args([str(a) for a in argv])


def digits_batch(ctx, n=8):
    dataset, _ = build_dataset(False, data_args(ctx))
    return torch.stack([dataset[i][0] for i in range(n)])


def listing(folder):
    """{relative path: (size, mtime_ns)} of every file under folder."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def ctx(compare_ctx):
    return compare_ctx


@pytest.fixture
def shipped_ctx(compare_ctx, tmp_path):
    """The context of an embedded-default run (shipped artefacts looked up under tmp_path/shipped), full budgets."""
    compare_ctx.quick, compare_ctx.epochs = False, None
    compare_ctx.shipped_root = str(tmp_path / 'shipped')
    return compare_ctx


# ---------------------------------------------------------------------------------------------------------------
# A-ViT


def marked_avit_checkpoint(ctx, path, value):
    """An A-ViT state dict of the baseline whose head bias is `value` everywhere (tells which file was loaded)."""
    model = avit_hook._avit_from_base(ctx, 10., 5.)
    with torch.no_grad():
        model.head.bias.fill_(value)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'model': model.state_dict()}, path)


def test_avit_shipped_artefact_used_by_default_never_written(shipped_ctx, monkeypatch):
    ctx = shipped_ctx
    args = hook_args(avit_hook, '--avit-gate-centers', 5)
    shipped = os.path.join(ctx.shipped_root, 'avit', avit_hook.artefact_name(ctx, args, 5.))
    marked_avit_checkpoint(ctx, os.path.join(shipped, 'checkpoint.pth'), 0.25)
    open(os.path.join(shipped, 'done'), 'w').close()
    before = listing(ctx.shipped_root)
    trained = []

    def fake_fine_tune(ctx_, args_, model, path, label):
        trained.append(path)
        marked_avit_checkpoint(ctx_, path, -0.5)

    monkeypatch.setattr(avit_hook, '_fine_tune', fake_fine_tune)
    (variant,) = avit_hook.variants('avit', ctx, args)
    assert trained == [] and variant.artefacts['checkpoint'] == os.path.join(shipped, 'checkpoint.pth')
    assert torch.all(variant.model.head.bias == 0.25)
    # --retrain and any other setting derive into the cache instead
    ctx.retrain = True
    (variant,) = avit_hook.variants('avit', ctx, args)
    assert len(trained) == 1 and trained[0].startswith(ctx.cache_dir) and torch.all(variant.model.head.bias == -0.5)
    ctx.retrain = False
    (variant,) = avit_hook.variants('avit', ctx, hook_args(avit_hook, '--avit-gate-centers', 5, '--avit-ponder', 0.01))
    assert len(trained) == 2 and trained[1].startswith(ctx.cache_dir)
    ctx.epochs = 3
    avit_hook.variants('avit', ctx, args)
    assert len(trained) == 3 and trained[2].startswith(ctx.cache_dir)
    assert listing(ctx.shipped_root) == before


def test_avit_per_image_gflops_follow_the_depth_counters(ctx):
    from avit.engine_act import evaluate
    model = avit_hook._avit_from_base(ctx, 10., 1.).eval()  # a low centre: tokens halt at different depths
    x = digits_batch(ctx, 16)
    with torch.no_grad():
        logits, extra = avit_hook.forward(model, x)
    per_image = extra['gflops']
    assert logits.shape == (16, 10) and per_image.shape == (16,)
    # each image: the project's MAC count over the tokens that are still active in each block
    depth, C, hidden = 12, model.embed_dim, model.blocks[0].mlp.fc1.out_features
    for counters, gflops in zip(model.counter_token, per_image):
        macs = 65 * C * 3 * 4 * 4 + C * 10
        for layer in range(1, depth + 1):
            n = int((counters >= layer).sum())
            macs += 4 * n * C * C + 2 * n * n * C + 2 * n * C * hidden
        assert float(gflops) == pytest.approx(macs / 1e9, rel=1e-12)
    assert per_image.min() < per_image.max() < model_macs(load_base_model(ctx)) / 1e9
    # the mean over the validation images is the engine's depth-count figure
    dataset, _ = build_dataset(False, data_args(ctx))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(96)), batch_size=32)
    with torch.no_grad():
        values = torch.cat([avit_hook.forward(model, images)[1]['gflops'] for images, _ in loader])
    _, act_stats = evaluate(loader, model, torch.device('cpu'))
    assert values.shape == (96,) and float(values.mean()) == pytest.approx(act_stats['gflops'], rel=1e-12)
    # nothing halts: every image costs the plain ViT's MACs
    model.gate_center = 1e4
    with torch.no_grad():
        full = avit_hook.forward(model, x)[1]['gflops']
    assert torch.all(full == model_macs(load_base_model(ctx)) / 1e9)


def test_avit_fine_tuning_log_names_the_variant(ctx, capsys):
    (variant,) = avit_hook.variants('avit', ctx, hook_args(avit_hook, '--avit-gate-centers', 3))
    out = capsys.readouterr().out
    assert '| avit beta=3: fine-tuning epoch 1/1' in out and 'Epoch: [' not in out
    assert re.search(r'^avit beta=3 epoch \[1/1\] Total time', out, re.M)
    assert os.path.isfile(os.path.join(os.path.dirname(variant.artefacts['checkpoint']), 'done'))
    # cached: a second call trains nothing
    avit_hook.variants('avit', ctx, hook_args(avit_hook, '--avit-gate-centers', 3))
    assert 'fine-tuning' not in capsys.readouterr().out


def test_avit_checkpoint_flag(ctx, tmp_path):
    with pytest.raises(MissingArtefact, match=r'nope-10-75\.pth.*avit/main_act\.py'):
        avit_hook.variants('avit', ctx, hook_args(avit_hook, '--avit-checkpoint', tmp_path / 'nope-10-75.pth'))
    path = tmp_path / 'digits-10-2.5.pth'  # the official naming: <name>-<scale>-<center>.pth
    marked_avit_checkpoint(ctx, str(path), 0.75)
    (variant,) = avit_hook.variants('avit', ctx, hook_args(avit_hook, '--avit-checkpoint', path))
    assert (variant.model.gate_scale, variant.model.gate_center) == (10., 2.5)
    assert torch.all(variant.model.head.bias == 0.75) and not os.path.exists(ctx.cache_dir)
    assert variant.forward(variant.model, digits_batch(ctx))[1]['gflops'].shape == (8,)
    unnamed = tmp_path / 'finetuned.pth'
    marked_avit_checkpoint(ctx, str(unnamed), 0.75)
    (variant,) = avit_hook.variants('avit', ctx, hook_args(avit_hook, '--avit-checkpoint', unnamed,
                                                           '--avit-gate-centers', 7))
    assert variant.model.gate_center == 7.
    with pytest.raises(Exception, match='does not name its gates'):
        avit_hook.variants('avit', ctx, hook_args(avit_hook, '--avit-checkpoint', unnamed))


# ---------------------------------------------------------------------------------------------------------------
# TAVT


def frontier_row(gene, macs, score):
    """A row of TAVT's population TSV: the gene tuple, MACs, score, method."""
    return f'{gene}\t{macs}\t{score}\t0\n'


def test_tavt_shipped_artefact_used_by_default_never_written(shipped_ctx, monkeypatch):
    from tavt import train
    ctx = shipped_ctx
    args = hook_args(tavt_hook)
    shipped = os.path.join(ctx.shipped_root, 'tavt', tavt_hook.artefact_name(ctx, args))
    os.makedirs(shipped)
    state = {'model': tavt_hook.tavt_model(ctx).state_dict()}
    state['model']['head.bias'] = torch.full_like(state['model']['head.bias'], 0.25)
    torch.save(state, os.path.join(shipped, 'distilled.bin'))
    with open(os.path.join(shipped, 'frontier.tsv'), 'w') as f:
        f.write(frontier_row((65,) * 12, 123, 0.5) + frontier_row((60,) * 12, 100, 0.4))
    open(os.path.join(shipped, 'done'), 'w').close()
    before = listing(ctx.shipped_root)
    calls = []
    monkeypatch.setattr(train, 'run_training', lambda *a, **k: calls.append('distil') or 0.)
    monkeypatch.setattr(train, 'search', lambda *a, **k: calls.append('search'))
    variants = tavt_hook.variants('tavt', ctx, args)
    assert calls == [] and [v.label for v in variants][0] == 'full' and len(variants) == 2
    assert variants[1].settings['gene'] == [60] * 12
    assert all(torch.all(v.model.head.bias == 0.25) for v in variants)
    assert variants[0].artefacts['tavt_checkpoint'] == os.path.join(shipped, 'distilled.bin')
    # --retrain, another budget or another search setting: derived under the cache (and never into `shipped`)
    for change in ('retrain', 'epochs', 'search'):
        calls.clear()
        ctx.retrain = change == 'retrain'
        args = hook_args(tavt_hook, *(['--tavt-epochs', 2] if change == 'epochs' else []),
                         *(['--tavt-population', 7] if change == 'search' else []))
        folder = os.path.join(ctx.cache_dir, 'tavt', tavt_hook.artefact_name(ctx, args))
        os.makedirs(os.path.join(folder, 'work', 'evo', 'baseline_adaptive'))
        with open(os.path.join(folder, 'work', 'evo', 'baseline_adaptive', f'population-iter{args.tavt_evo_iter}.tsv'),
                  'w') as f:
            f.write(frontier_row((65,) * 12, 123, 0.5))
        variants = tavt_hook.variants('tavt', ctx, args)
        assert calls == ['distil', 'search'], change
        assert variants[0].artefacts['tavt_checkpoint'] == os.path.join(folder, 'distilled.bin')
    assert listing(ctx.shipped_root) == before


# ---------------------------------------------------------------------------------------------------------------
# the shipped folders themselves


def shipped_folders(method):
    root = os.path.join(SHIPPED, method)
    return sorted(os.path.join(root, d) for d in os.listdir(root)) if os.path.isdir(root) else []


@pytest.mark.parametrize('method', ['avit', 'tavt'])
def test_shipped_files_match_their_readme(method):
    folders = shipped_folders(method)
    assert folders, f'no shipped {method} artefact'
    for folder in folders:
        assert os.path.isfile(os.path.join(folder, 'done'))
        with open(os.path.join(folder, 'README.md')) as f:
            readme = f.read()
        listed = dict(re.findall(r'`([\w.-]+)`: SHA-256 `([0-9a-f]{64})`', readme))
        files = sorted(n for n in os.listdir(folder) if n not in ('README.md', 'done'))
        assert sorted(listed) == files, folder
        for name, digest in listed.items():
            with open(os.path.join(folder, name), 'rb') as f:
                assert hashlib.sha256(f.read()).hexdigest() == digest, os.path.join(folder, name)


def test_shipped_artefacts_are_the_demo_defaults():
    """`python tools/compare.py` (no arguments) finds a shipped artefact for every default A-ViT and TAVT variant."""
    from tools import compare
    args = compare.get_parser(['avit', 'tavt']).parse_args(['--methods', 'avit,tavt'])
    ctx = compare.build_context(args)
    from shared.compare_api import artefact_dir
    folders = [artefact_dir(ctx, 'avit', avit_hook.artefact_name(ctx, args, c)) for c in args.avit_gate_centers]
    folders.append(artefact_dir(ctx, 'tavt', tavt_hook.artefact_name(ctx, args)))
    for folder in folders:
        assert folder.startswith(SHIPPED) and os.path.isfile(os.path.join(folder, 'done')), folder
    assert sorted(folders) == sorted(shipped_folders('avit') + shipped_folders('tavt'))
