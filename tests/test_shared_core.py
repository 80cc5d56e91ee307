"""The lead's shared core: DeiT argument groups, meters, engine, AMP scaler, FLOPs convention, model resolution."""


import pytest
import torch

from shared import args as shared_args
from shared.engine import build_criterion, build_mixup, build_optimization, evaluate, log_epoch, train_one_epoch
from shared.flops import flop_counter_macs, model_macs, vit_macs
from shared.metrics import MetricLogger, SmoothedValue
from shared.models import DIGITS_VIT, create_model


def test_deit_parser_defaults_and_spellings():
    p = shared_args.deit_parser(epochs=30, model='deit_small_patch16_224')
    a = p.parse_args([])
    assert (a.epochs, a.model, a.batch_size, a.lr, a.model_ema, a.repeated_aug, a.pin_mem) == \
        (30, 'deit_small_patch16_224', 64, 5e-4, True, True, True)
    a = p.parse_args(['--no-model-ema', '--output_dir', 'x', '--start_epoch', '3', '--dr', '0.5', '--local-rank', '1'])
    assert (a.model_ema, a.output_dir, a.start_epoch, a.decay_rate, a.local_rank) == (False, 'x', 3, 0.5, 1)
    assert p.parse_args(['--local_rank=2']).local_rank == 2
    with pytest.raises(SystemExit):  # DeiT's spelling is --output_dir; argparse must not silently accept another
        p.parse_args(['--output-dir', 'x'])


def test_smoothed_value_and_metric_logger():
    v = SmoothedValue(window_size=2)
    for x in (1.0, 2.0, 6.0):
        v.update(x)
    assert v.global_avg == pytest.approx(3.0) and v.median == pytest.approx(2.0) and v.value == 6.0
    ml = MetricLogger()
    ml.update(loss=torch.tensor(2.0), acc=1)
    assert 'loss: 2.0000' in str(ml) and ml.acc.global_avg == 1


def _digits_like_batches(n=64, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % classes
    x[torch.arange(n), y % 3, :8, :8] += 3.0  # learnable signal
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)


def test_train_one_epoch_lowers_the_loss_and_evaluate_reports(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model('vit_digits_patch4_32', num_classes=4, depth=2)
    args = shared_args.deit_parser().parse_args(['--lr', '5e-3', '--unscale-lr', '--warmup-epochs', '0',
                                                 '--mixup', '0', '--cutmix', '0', '--smoothing', '0',
                                                 '--weight-decay', '0', '--sched', 'step'])
    device = torch.device('cpu')
    optimizer, scaler, sched = build_optimization(args, model, device)
    criterion = build_criterion(args, build_mixup(args, 4))
    loader = _digits_like_batches()
    first = evaluate(loader, model, device)['loss']
    for epoch in range(4):
        train_one_epoch(model, criterion, loader, optimizer, device, epoch, scaler, print_freq=100)
    stats = evaluate(loader, model, device)
    assert stats['loss'] < first * 0.7
    out = capsys.readouterr().out
    assert '* Acc@1' in out and 'Averaged stats:' in out and 'Epoch: [3]' in out
    log_epoch(str(tmp_path), {'epoch': 3, 'test_acc1': stats['acc1']})
    assert '"test_acc1"' in (tmp_path / 'log.txt').read_text()


def test_loss_fn_hook_meters_and_evaluate_extras():
    model = create_model('vit_digits_patch4_32', num_classes=4, depth=1)
    args = shared_args.deit_parser().parse_args(['--unscale-lr', '--mixup', '0', '--cutmix', '0'])
    optimizer, scaler, _ = build_optimization(args, model, torch.device('cpu'))

    def loss_fn(m, x, y):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        return loss, {'half_loss': loss.item() / 2}

    stats = train_one_epoch(model, None, _digits_like_batches(32), optimizer, torch.device('cpu'), 0, scaler,
                            loss_fn=loss_fn, print_freq=100)
    assert stats['half_loss'] == pytest.approx(stats['loss'] / 2)
    ev = evaluate(_digits_like_batches(32), model, torch.device('cpu'), forward_fn=lambda m, x: (m(x), {'k': 7}))
    assert ev['k'] == 7


@pytest.mark.parametrize('name,expected', [('deit_tiny_patch16_224', 1.254), ('deit_small_patch16_224', 4.599),
                                           ('deit_base_patch16_224', 17.564)])
def test_flops_convention_reference_values(name, expected):
    assert round(model_macs(create_model(name)) / 1e9, 3) == expected


def test_flops_equal_flop_counter_on_same_forward():
    model = create_model('vit_digits_patch4_32')
    d = DIGITS_VIT
    # the counter does not see the class slot the convention counts in the patch embedding
    quirk = d['embed_dim'] * 3 * d['patch_size'] ** 2
    assert flop_counter_macs(model, torch.randn(2, 3, 32, 32)) == pytest.approx(model_macs(model) - quirk)


def test_vit_macs_reduced_tokens():
    full = vit_macs([197] * 12, embed_dim=384, patch_size=16, num_patches=196)
    reduced = vit_macs([197] * 12, [100] * 12, embed_dim=384, patch_size=16, num_patches=196)
    assert full - reduced == pytest.approx(12 * 8 * 97 * 384 ** 2)
    with pytest.raises(ValueError):
        vit_macs([1, 2], [1], embed_dim=8, patch_size=2, num_patches=4)


def test_create_model_resolves_local_names_without_touching_timm():
    import timm
    local = {'deit_base_patch16_224': lambda **kw: 'local'}
    assert create_model('deit_base_patch16_224', local) == 'local'
    assert isinstance(create_model('deit_tiny_patch16_224', depth=1), timm.models.VisionTransformer)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model('nope', local)


def test_randaugment_posterize_at_zero_bits_gives_black_image():
    import numpy as np
    from PIL import Image
    from timm.data import auto_augment
    import shared.augment  # noqa: F401
    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    op = auto_augment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)  # 4 - int(10/10*4) = 0 bits
    assert np.asarray(op(img)).max() == 0
    assert np.asarray(auto_augment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=0)(img)).max() == 192
