"""diffrate.compare and tavt.compare: the variants tools/compare.py measures, made by each method's own code, and the
DiffRate schedules shipped for the embedded default."""
import argparse
import os

import pytest
import torch

from diffrate import compare as diffrate_hook
from diffrate.flops import vit_gflops, vit_token_counts
from shared.checkpoint import safe_load
from shared.compare_api import MissingArtefact, data_args, load_base_model
from shared.datasets import build_dataset
from shared.flops import model_macs
from tavt import compare as tavt_hook
from tests.test_tocom_compare import Trained, check_readme_hashes, embedded_ctx, listing, shipped_folders


@pytest.fixture
def ctx(compare_ctx):
    return compare_ctx


def digits_batch(ctx, n=8):
    dataset, _ = build_dataset(False, data_args(ctx))
    return torch.stack([dataset[i][0] for i in range(n)])


def hook_args(hook, *argv):
    parser = argparse.ArgumentParser()
    hook.add_args(parser)
    return parser.parse_args([str(a) for a in argv])


def tokens_out_of_blocks(model, blocks, x):
    counts = []
    handles = [b.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for b in blocks]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return counts, logits


def tome_mlp_tokens(r, tokens=65, depth=12):
    """Tokens left after each block's merge under ToMe at r: r per block, at most half the non-class tokens."""
    left = []
    for _ in range(depth):
        tokens -= min(r, (tokens - 1) // 2)
        left.append(tokens)
    return left


def test_diffrate_default_targets_are_tome_gflops(ctx):
    expected = [round(vit_gflops(64, 4, 64, 10, [65] * 12, tome_mlp_tokens(r)), 6) for r in (3, 4, 5)]
    assert diffrate_hook.default_targets(ctx) == expected
    assert diffrate_hook.default_targets(ctx, argparse.Namespace(tome_r=[5, 2])) == [
        round(vit_gflops(64, 4, 64, 10, [65] * 12, tome_mlp_tokens(r)), 6) for r in (2, 5)]


def test_diffrate_variants_follow_their_schedule(ctx):
    base_gflops = model_macs(load_base_model(ctx)) / 1e9
    args = hook_args(diffrate_hook, '--target-flops', 0.03)
    (variant,) = diffrate_hook.variants('diffrate', ctx, args)
    prune, merge = variant.settings['prune_kept_num'], variant.settings['merge_kept_num']
    assert variant.label == 'target=0.03' and variant.gflops < base_gflops
    model = variant.model
    assert not model.training
    assert variant.gflops == pytest.approx(vit_gflops(64, 4, 64, 10, prune, merge), abs=0)
    x = digits_batch(ctx)
    counts, logits = tokens_out_of_blocks(model, model.blocks, x)
    assert logits[0].shape == (8, 10)  # the patched model's own forward returns (logits, flops)
    assert counts == vit_token_counts(65, prune, merge)[1]  # tokens leaving each block = the schedule's
    assert counts[-1] < 65
    assert variant.forward(model, x).shape == (8, 10)
    # the search ran in train mode: the proxies' logits moved away from their zero initialisation
    search_dir = os.path.dirname(variant.artefacts['schedule'])
    state = safe_load(os.path.join(search_dir, 'checkpoint.pth'))['model']
    moved = [k for k, v in state.items() if k.endswith('selected_probability') and v.abs().max() > 0]
    assert len(moved) >= 10
    # cached: a second call reuses the schedule
    stamp = os.path.getmtime(variant.artefacts['schedule'])
    (again,) = diffrate_hook.variants('diffrate', ctx, args)
    assert os.path.getmtime(again.artefacts['schedule']) == stamp and again.settings == variant.settings


def test_diffrate_missing_schedule_names_the_command(ctx, tmp_path):
    ctx.artefacts['diffrate_schedule_path'] = str(tmp_path / 'nope.json')
    with pytest.raises(MissingArtefact, match=r'nope\.json.*diffrate/main\.py'):
        diffrate_hook.variants('diffrate', ctx, hook_args(diffrate_hook, '--target-flops', 0.03))


@pytest.fixture
def fake_shipped_schedules(tmp_path, compare_ctx, monkeypatch):
    """Shipped folders, under a temporary shipped root, holding a schedule for each default target; a search raises
    `Trained` instead of running."""
    import diffrate.main
    from diffrate import schedules

    def no_search(args, model=None):
        raise Trained(args.output_dir)

    monkeypatch.setattr(diffrate.main, 'main', no_search)
    ctx = embedded_ctx(tmp_path / 'cache', tmp_path / 'shipped', base=compare_ctx.base_checkpoint)
    args = hook_args(diffrate_hook)
    shipped = {}
    for i, target in enumerate(diffrate_hook.default_targets(ctx)):
        folder = tmp_path / 'shipped' / 'diffrate' / diffrate_hook.artefact_name(ctx, args, target)
        folder.mkdir(parents=True)
        prune, merge = [65] * 12, [65] + [61 - 4 * i] * 11
        schedules.write_entry(str(folder / diffrate_hook.SCHEDULE_FILE), ctx.model_name, target, prune, merge)
        (folder / 'done').touch()
        shipped[target] = (folder, prune, merge)
    return ctx, shipped


def test_diffrate_shipped_schedules_are_loaded_not_searched(fake_shipped_schedules):
    ctx, shipped = fake_shipped_schedules
    before = {t: listing(f) for t, (f, _, _) in shipped.items()}
    variants = diffrate_hook.variants('diffrate', ctx, hook_args(diffrate_hook))
    assert [v.settings['target_flops'] for v in variants] == list(shipped)
    for v in variants:
        folder, prune, merge = shipped[v.settings['target_flops']]
        assert v.artefacts['schedule'] == str(folder / diffrate_hook.SCHEDULE_FILE)
        assert (v.settings['prune_kept_num'], v.settings['merge_kept_num']) == (prune, merge)
        assert v.model.get_kept_num() == (prune, merge)
    assert {t: listing(f) for t, (f, _, _) in shipped.items()} == before and not os.path.exists(ctx.cache_dir)


@pytest.mark.parametrize('change', [dict(retrain=True), dict(epochs=3), dict(argv=('--diffrate-arch-lr', 0.01)),
                                    dict(argv=('--diffrate-recipe', 'reference')),
                                    dict(argv=('--diffrate-batch-size', 64)), dict(argv=('--diffrate-granularity', 2)),
                                    dict(argv=('--target-flops', 0.03))])
def test_diffrate_shipped_schedules_ignored_under_other_settings(fake_shipped_schedules, change):
    ctx, shipped = fake_shipped_schedules
    before = {t: listing(f) for t, (f, _, _) in shipped.items()}
    for field in ('retrain', 'epochs'):
        if field in change:
            setattr(ctx, field, change[field])
    with pytest.raises(Trained) as searched:
        diffrate_hook.variants('diffrate', ctx, hook_args(diffrate_hook, *change.get('argv', ())))
    assert str(searched.value).startswith(os.path.join(ctx.cache_dir, 'diffrate'))
    assert {t: listing(f) for t, (f, _, _) in shipped.items()} == before


def test_diffrate_shipped_schedules_match_their_readme_and_the_defaults(tmp_path):
    folders = shipped_folders('diffrate')
    ctx = embedded_ctx(tmp_path)
    targets = diffrate_hook.default_targets(ctx)
    assert len(folders) == len(targets)
    for folder in folders:
        check_readme_hashes(folder)
        assert sorted(os.listdir(folder)) == ['README.md', diffrate_hook.SCHEDULE_FILE, 'done']
    # the embedded default picks one per default target, and each schedule meets its target within one candidate
    for target in targets:
        path = diffrate_hook.search(ctx, hook_args(diffrate_hook), target)
        assert os.path.dirname(path) in folders
        prune, merge = diffrate_hook.read_schedule(path, ctx.model_name, target)
        assert abs(vit_gflops(64, 4, 64, 10, prune, merge) - target) < 0.002
    assert not os.path.exists(tmp_path / 'diffrate')


def test_tavt_model_of_the_baseline_is_the_timm_model(ctx):
    x = digits_batch(ctx)
    timm_model, tavt_model = load_base_model(ctx).eval(), tavt_hook.tavt_model(ctx).eval()
    with torch.no_grad():
        assert torch.allclose(tavt_model(x), timm_model(x), atol=1e-5, rtol=0)


def test_tavt_variants(ctx):
    from tools.flops import main as tools_flops
    variants = tavt_hook.variants('tavt', ctx, hook_args(tavt_hook, '--tavt-genes', 2))
    assert variants[0].label == 'full' and len(variants) >= 2
    x = digits_batch(ctx)
    for v in variants:
        assert not v.model.training
        with torch.no_grad():
            assert v.model(x).shape == (8, 10)
    full = variants[0]
    assert full.gflops == pytest.approx(model_macs(load_base_model(ctx)) / 1e9, abs=0)
    searched = variants[1]
    gene = searched.settings['gene']
    assert searched.gflops < full.gflops
    assert searched.gflops == tools_flops(['--method', 'tavt', '--model_type', 'ViT-digits', '--img_size', '32',
                                           '--num_classes', '10', '--config', ','.join(map(str, gene))])
    # the gene is applied: the FFN of layer i runs on gene[i] tokens
    ffns = [b.ffn for b in searched.model.transformer.encoder.layer]
    assert tokens_out_of_blocks(searched.model, ffns, x)[0] == gene
    # cached, and a missing user checkpoint names the command
    stamp = os.path.getmtime(full.artefacts['tavt_checkpoint'])
    tavt_hook.variants('tavt', ctx, hook_args(tavt_hook))
    assert os.path.getmtime(full.artefacts['tavt_checkpoint']) == stamp
    ctx.artefacts['tavt_checkpoint_path'] = '/nonexistent/distilled.bin'
    with pytest.raises(MissingArtefact, match=r'distilled\.bin.*tavt/train\.py --do_distil'):
        tavt_hook.variants('tavt', ctx, hook_args(tavt_hook))
