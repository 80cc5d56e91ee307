"""LV-ViT with ToE: kept tokens restored to their grid positions with zeros elsewhere; token-labelling loss."""
import pytest
import torch

from tests.conftest import run_script
from toe.lvvit.loss import TokenLabelCrossEntropy
from toe.lvvit.models import create_model
from toe.token_select import TokenSelect


def _model(name='lvvit_t', img=64):
    torch.manual_seed(0)
    m = create_model(name, num_classes=5, img_size=img)
    m.token_select = TokenSelect([0, 1, 2], [0.4, 0.7, 1.0], 0.2, 2)
    m.token_select.sparse_inference = True
    return m


def test_restore_zero_fills_dropped_positions():
    m = _model(img=224).eval()
    x = torch.randn(1, 3, 224, 224)
    for epoch, kept in [(0, 78), (1, 136), (2, 196)]:
        m.token_select.update_current_stage(epoch)
        with torch.no_grad():
            feat = m.forward_features(x)
        assert feat.shape == (1, 197, 240)
        assert (feat[0, 1:].abs().sum(-1) != 0).sum().item() == kept  # 118 zero rows at stage 1 (spec §3.2)


def test_train_forward_and_loss_goes_down():
    import numpy as np
    np.random.seed(0)  # MixToken boxes
    m = _model().train()
    x, y = torch.randn(4, 3, 64, 64), torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    m.token_select.update_current_stage(0)
    crit = TokenLabelCrossEntropy(classes=5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        cls, aux, box = m(x)
        assert cls.shape == (4, 5) and aux.shape == (4, 16, 5)
        loss = crit((cls, aux, box), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    dense = torch.rand(4, 5, 2 + 16).softmax(1)
    assert torch.isfinite(crit(m(x), dense))


# ------------------------------------------------------------------------------------------- toe/lvvit/main.py
def make_label_map_set(root, classes=2, train_per_class=4, val_per_class=2, size=64, grid=8, k=3):
    """ImageNet-style train/ and validation/ folders plus TokenLabeling label maps (2, K, grid, grid) as half."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    k = min(k, classes)
    data, labels = root / 'data', root / 'labels'
    for split, n in (('train', train_per_class), ('validation', val_per_class)):
        for c in range(classes):
            d = data / split / f'n0{c}'
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f'img_{i}.JPEG')
                if split == 'train':
                    (labels / f'n0{c}').mkdir(parents=True, exist_ok=True)
                    scores = torch.rand(k, grid, grid).sort(0, descending=True).values
                    idx = torch.stack([torch.randperm(classes)[:k] for _ in range(grid * grid)], 1).view(k, grid, grid)
                    torch.save(torch.stack([scores, idx.float()]).half(), labels / f'n0{c}' / f'img_{i}.pt')
    return data, labels


LV_TOE = ['--expansion-step', '0', '1', '2', '--keep-rate', '0.4', '0.7', '1.0', '--initialization-keep-rate', '0.2',
          '--expansion-multiple-stage', '2']


def test_lvvit_flags_and_bad_inputs(capsys):
    import pytest
    from toe.lvvit.main import parse_args
    args, text = parse_args(['/data', '--model', 'lvvit_s', '-b', '256', '--img-size', '224', '--drop-path', '0.1',
                             '--token-label', '--token-label-data', '/labels', '--token-label-size', '14',
                             '--model-ema', '--apex-amp', '--local-rank=1', *LV_TOE])
    assert args.apex_amp and args.local_rank == 1 and args.keep_rate == [0.4, 0.7, 1.0] and 'apex_amp' in text
    assert parse_args(['/data', '--local_rank', '3'])[0].local_rank == 3
    args = parse_args(['/data'])[0]  # the original exits without the list flags
    assert args.expansion_step == [0, 100, 200] and args.initialization_keep_rate == 0.25
    for flags, msg in ((['--keep-rate', '0.7', '0.4', '1.0'], 'non-decreasing'), (['--expansion-step', '0', '1'],
                       'has 2 values'), (['--keep-rate', '0.4', '0.7', '1.2'], '<= 1.0'),
                       (['--initialization-keep-rate', '0.5', '--keep-rate', '0.4', '0.7', '1.0'], 'above the first')):
        with pytest.raises(SystemExit):
            parse_args(['/data', *flags])
        assert msg in capsys.readouterr().err


def test_token_label_target_shapes_and_values():
    from toe.lvvit.data import token_label_target
    B, K, G, classes = 2, 3, 8, 5
    maps = torch.zeros(B, 3, K, G, G)
    maps[:, 0] = torch.tensor([0.7, 0.2, 0.1]).view(1, K, 1, 1)
    maps[:, 1, 0], maps[:, 1, 1], maps[:, 1, 2] = 4., 1., 0.
    maps[:, 2, 0, 0, :4] = torch.tensor([0., 0., 1., 1.])  # the whole image
    maps[:, 2, 0, 0, 5] = torch.tensor([2., 3.])
    t = token_label_target(maps, classes, smoothing=0.1, label_size=4)
    assert t.shape == (B, classes, 2 + 16)
    assert torch.allclose(t[:, :, 0].sum(1), torch.ones(B))
    # tlt's arithmetic: softmax * on_value + off_value per class, so the token slots sum to 1 + smoothing / classes
    assert torch.allclose(t[:, :, 1:].sum(1), torch.full((B, 17), 1 + 0.1 / classes))
    assert t[0, :, 0].argmax() == 2 and t[1, :, 0].argmax() == 3  # ground truth slot
    assert (t[:, :, 1:].argmax(1) == 4).all()  # the teacher's top class everywhere


def _label_maps(B=4, K=3, G=8, classes=5):
    g = torch.Generator().manual_seed(0)
    maps = torch.zeros(B, 3, K, G, G)
    maps[:, 0] = torch.rand(B, K, G, G, generator=g)
    maps[:, 1] = torch.randint(0, classes, (B, K, G, G), generator=g).float()
    maps[:, 2, 0, 0, :4] = torch.tensor([0.1, 0.2, 0.6, 0.7])
    maps[:, 2, 0, 0, 5] = torch.arange(B).float() % classes
    return maps


@pytest.mark.parametrize('mode', ['batch', 'elem'])
@pytest.mark.parametrize('alphas', [(0.8, 0.), (0., 1.)])  # mixup, cutmix
def test_token_label_mixup_mixes_images_and_label_map_targets_by_one_lambda(mode, alphas):
    import numpy as np
    from toe.lvvit.data import TokenLabelMixup, token_label_target
    maps, classes = _label_maps(), 5
    x = torch.rand(4, 3, 16, 16)
    np.random.seed(0)
    mix = TokenLabelMixup(label_size=4, mixup_alpha=alphas[0], cutmix_alpha=alphas[1], mode=mode,
                          label_smoothing=0.1, num_classes=classes)
    mixed, target = mix(x.clone(), maps)
    plain = token_label_target(maps, classes, 0.1, 4)
    assert target.shape == plain.shape == (4, classes, 2 + 16)
    # recover each image's lambda from its pixels: the share taken from itself (cutmix) or the blend weight (mixup)
    if alphas[1]:
        lam = (mixed == x).float().mean((1, 2, 3))
    else:
        diff = x - x.flip(0)
        lam = ((mixed - x.flip(0)) * diff).sum((1, 2, 3)) / diff.square().sum((1, 2, 3))
    if mode == 'batch':
        assert torch.allclose(lam, lam[:1].expand(4), atol=1e-5)
    assert (lam < 1 - 1e-3).any()
    expected = plain * lam.view(4, 1, 1) + plain.flip(0) * (1 - lam.view(4, 1, 1))
    torch.testing.assert_close(target, expected, atol=1e-5, rtol=0)


def test_token_label_mixup_plain_labels_and_switched_off():
    import numpy as np
    from timm.data.mixup import Mixup
    from toe.lvvit.data import TokenLabelMixup, token_label_target
    labels, x = torch.tensor([0, 3, 1, 4]), torch.rand(4, 3, 16, 16)
    np.random.seed(1)
    ours = TokenLabelMixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=5)(x.clone(), labels)
    np.random.seed(1)
    timms = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=5)(x.clone(), labels)
    torch.testing.assert_close(ours, timms)  # labels without maps: timm's own mixup, same draws
    mix = TokenLabelMixup(label_size=4, mixup_alpha=0.8, num_classes=5)
    mix.mixup_enabled = False  # what --mixup-off-epoch does
    maps = _label_maps()
    out, target = mix(x.clone(), maps)
    assert torch.equal(out, x) and torch.equal(target, token_label_target(maps, 5, 0.1, 4))


def test_lvvit_main_stages_label_maps_and_resume(tmp_path):
    import csv
    data, labels = make_label_map_set(tmp_path)
    out = tmp_path / 'out'
    common = [data, '--model', 'lvvit_t', '--img-size', '64', '--num-classes', '2', '-b', '4', '-j', '0',
              '--token-label', '--token-label-data', labels, '--token-label-size', '4', '--model-ema', '--apex-amp',
              '--device', 'cpu', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--output', out, *LV_TOE]
    r = run_script(['toe/lvvit/main.py', *common, '--epochs', '2'], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    # 64 px / 16 = 4x4 = 16 patches: 3 seeds (stride 4), stages keep 6, 10 (float increments), then all 16
    assert 'expansion stage 1/3, 6/16 patch tokens kept' in r.stdout
    assert 'expansion stage 2/3, 10/16 patch tokens kept' in r.stdout
    assert 'apex' in r.stdout and 'Test (EMA)' in r.stdout
    [run] = list((out / 'train').iterdir())
    assert {'args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'checkpoint-1.pth.tar'} <= \
        {p.name for p in run.iterdir()}
    rows = list(csv.DictReader(open(run / 'summary.csv')))
    assert [int(r_['epoch']) for r_ in rows] == [0, 1] and float(rows[0]['train_total_train_time']) > 0
    ckpt = torch.load(run / 'last.pth.tar', weights_only=False)
    assert ckpt['epoch'] == 1 and ckpt['arch'] == 'lvvit_t' and ckpt['version'] == 2 and 'state_dict_ema' in ckpt
    # resume across the stage boundary: epoch 2 is the full-token stage
    r = run_script(['toe/lvvit/main.py', *common, '--epochs', '3', '--resume', run / 'last.pth.tar'], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert 'expansion stage 3/3, 16/16 patch tokens kept' in r.stdout and 'stage 1/3' not in r.stdout


def test_lvvit_main_with_mixup_cutmix(tmp_path, capsys):
    from toe.lvvit.main import parse_args
    data, labels = make_label_map_set(tmp_path)
    common = [data, '--model', 'lvvit_t', '--img-size', '64', '--num-classes', '2', '-j', '0', '--token-label',
              '--token-label-data', labels, '--token-label-size', '4', '--device', 'cpu', '--warmup-epochs', '0',
              '--cooldown-epochs', '0', '--output', tmp_path / 'out', '--mixup', '0.8', '--cutmix', '1.0', *LV_TOE]
    with pytest.raises(SystemExit):
        parse_args([str(a) for a in common] + ['-b', '3'])
    assert 'must be even' in capsys.readouterr().err
    r = run_script(['toe/lvvit/main.py', *common, '-b', '4', '--epochs', '1'], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert 'Train: 0' in r.stdout and 'Loss: nan' not in r.stdout


def test_lvvit_main_no_seed_token(tmp_path):
    data, labels = make_label_map_set(tmp_path, train_per_class=1, val_per_class=1)
    r = run_script(['toe/lvvit/main.py', data, '--model', 'lvvit_t', '--img-size', '32', '--token-label',
                    '--token-label-data', labels, '--token-label-size', '2', '--device', 'cpu', '-j', '0',
                    '--output', tmp_path / 'o', *LV_TOE])
    assert r.returncode != 0 and 'no seed token' in r.stdout


def test_lvvit_main_missing_label_maps(tmp_path):
    data, labels = make_label_map_set(tmp_path, train_per_class=1, val_per_class=1)
    next(labels.rglob('*.pt')).unlink()
    r = run_script(['toe/lvvit/main.py', data, '--model', 'lvvit_t', '--img-size', '32', '--token-label',
                    '--token-label-data', labels, '--token-label-size', '2', '--device', 'cpu', '-j', '0',
                    '--output', tmp_path / 'o'])
    assert r.returncode != 0 and 'no label map' in r.stdout


@pytest.mark.heavy
def test_lvvit_run_script_torchrun_two_processes(tmp_path):
    """ToE/lvvit/run/imagenet_small_run1.sh under torchrun with 2 processes on a generated label-map set: only paths,
    batch size, epochs (steps 0/100/200 of 300 -> 0/1/2 of 3, no cooldown) and image counts changed."""
    from tests.conftest import torchrun
    data, labels = make_label_map_set(tmp_path, classes=2, train_per_class=2, val_per_class=1, size=224, grid=15, k=5)
    out = tmp_path / 'result'
    r = torchrun(['toe/lvvit/main.py', data, '--output', out, '--model', 'lvvit_s', '-b', '2', '--img-size', '224',
                  '--drop-path', '0.1', '--token-label', '--token-label-data', labels, '--token-label-size', '14',
                  '--model-ema', '--apex-amp', '--expansion-step', '0', '1', '2', '--keep-rate', '0.4', '0.7', '1.0',
                  '--initialization-keep-rate', '0.2', '--expansion-multiple-stage', '2', '--epochs', '3',
                  '--cooldown-epochs', '0', '-j', '0'], timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:]
    assert 'distributed init (rank 1)' in r.stdout
    for line in ('expansion stage 1/3, 78/196', 'expansion stage 2/3, 136/196', 'expansion stage 3/3, 196/196'):
        assert line in r.stdout
    [run] = list((out / 'train').iterdir())
    assert (run / 'checkpoint-2.pth.tar').exists() and len((run / 'summary.csv').read_text().splitlines()) == 4


def _index_map(K=2, H=8, W=8):
    scores = torch.arange(K * H * W, dtype=torch.float32).view(K, H, W) + 1
    return torch.stack([scores, scores + 1000])


def test_label_map_follows_translate_and_rotate_like_tokenlabeling():
    import numpy as np
    from toe.lvvit.data import _LABEL_MAP_OPS
    m = _index_map()
    H = W = 8
    moved = _LABEL_MAP_OPS['TranslateXRel'](m, 3 / W)  # output column c reads input column c + 3
    for r in range(H):
        for c in range(W):
            src = c + 3
            assert moved[0, :, r, c].tolist() == (m[0, :, r, src].tolist() if src < W else [0., 0.])
            assert moved[1, :, r, c].tolist() == m[1, :, r, min(src, W - 1)].tolist()  # indices repeat the border
    turned = _LABEL_MAP_OPS['Rotate'](m, 90.)  # TokenLabeling's matrix: output (r, c) reads input (c, W - r)
    expected = np.zeros((2, 2, H, W), dtype=np.float32)
    for r in range(H):
        for c in range(W):
            expected[0, :, r, c] = m[0, :, c, W - r].numpy() if W - r < W else 0.
            expected[1, :, r, c] = m[1, :, c, min(W - r, W - 1)].numpy()
    assert np.array_equal(turned.numpy(), expected)


def test_paired_rand_augment_keeps_timms_image_stream_and_moves_maps():
    import random
    import numpy as np
    from PIL import Image
    from timm.data import rand_augment_transform
    from toe.lvvit.data import PairedRandAugment
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    params = dict(translate_const=14, img_mean=(124, 116, 104))
    m = _index_map()
    moved = 0
    for seed in range(40):
        random.seed(seed), np.random.seed(seed)
        alone = rand_augment_transform('rand-m9-mstd0.5-inc1', dict(params))(img)
        random.seed(seed), np.random.seed(seed)
        paired, label = PairedRandAugment(rand_augment_transform('rand-m9-mstd0.5-inc1', dict(params)))(img, m)
        assert paired.tobytes() == alone.tobytes()  # the label ops draw nothing: the image sees timm's draws
        assert label.shape == m.shape
        moved += not torch.equal(label, m)
    assert 0 < moved < 40


def test_token_label_size_1_scores_the_class_output(capsys):
    from timm.loss import SoftTargetCrossEntropy
    from toe.lvvit.loss import TokenLabelSoftTargetCrossEntropy
    from toe.lvvit.main import parse_args
    torch.manual_seed(0)
    out, target = torch.randn(3, 5), torch.rand(3, 5, 2)
    assert TokenLabelSoftTargetCrossEntropy()(out, target) == SoftTargetCrossEntropy()(out, target[:, :, 1])
    assert TokenLabelSoftTargetCrossEntropy()(out, target[:, :, 0]) == SoftTargetCrossEntropy()(out, target[:, :, 0])
    with pytest.raises(SystemExit):
        parse_args(['/data', '--model', 'lvvit_t', '--token-label', '--token-label-size', '1'])
    assert 'trains with the dense head' in capsys.readouterr().err
    # one training step of the plain model on size-1 label-map targets (it crashed in the loss before)
    from toe.lvvit.data import token_label_target
    model = _model('lvvit').train()
    maps = _label_maps(B=2, classes=5)
    loss = TokenLabelSoftTargetCrossEntropy()(model(torch.randn(2, 3, 64, 64)), token_label_target(maps, 5, 0.1, 1))
    loss.backward()
    assert torch.isfinite(loss) and model.head.weight.grad.abs().sum() > 0
