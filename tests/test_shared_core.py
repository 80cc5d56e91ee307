"""The lead's shared core: DeiT argument groups, meters, engine, AMP scaler, FLOPs convention, model resolution."""


import pytest
import torch

from shared import args as shared_args
from shared.engine import build_criterion, build_mixup, build_optimization, evaluate, train_one_epoch
from shared.rundir import RunDir
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
    RunDir(tmp_path).append_log({'epoch': 3, 'test_acc1': stats['acc1']})
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


def test_log_every_prints_the_progress_line_format(monkeypatch, capsys):
    import time
    clock = iter(1000.0 + 0.25 * k for k in range(100))  # every clock read advances a quarter second
    monkeypatch.setattr(time, 'time', lambda: next(clock))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    ml = MetricLogger(delimiter='  ')
    ml.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    for step in ml.log_every(range(12), 10, 'Epoch: [3]'):
        ml.update(loss=torch.tensor(1.0 / (step + 1)), lr=1e-3 * (step + 1), unused=None)
        ml.meters['acc1'].update(50.0 + step, n=3)
    assert capsys.readouterr().out.splitlines() == [
        'Epoch: [3]  [ 0/12]  eta: 0:00:06  lr: 0.001000  loss: 1.0000 (1.0000)  acc1: 50.0000 (50.0000)  '
        'time: 0.5000  data: 0.2500',
        'Epoch: [3]  [10/12]  eta: 0:00:01  lr: 0.011000  loss: 0.1667 (0.2745)  acc1: 55.0000 (55.0000)  '
        'time: 0.5000  data: 0.2500',
        'Epoch: [3]  [11/12]  eta: 0:00:00  lr: 0.012000  loss: 0.1429 (0.2586)  acc1: 55.0000 (55.5000)  '
        'time: 0.5000  data: 0.2500',
        'Epoch: [3] Total time: 0:00:09 (0.7708 s / it)']
    # median of the 12 losses is torch's lower median (1/7), the mean over the window is a float32 mean
    assert ml.loss.median == pytest.approx(1 / 7) and ml.acc1.global_avg == pytest.approx(55.5)
    assert 'unused' not in ml.meters


def test_smoothed_value_window_and_weighted_totals():
    v = SmoothedValue(window_size=3, fmt='{median:.2f} {avg:.2f} {global_avg:.2f} {max:.2f} {value:.2f}')
    for x, n in ((1.0, 1), (8.0, 2), (2.0, 1), (4.0, 4)):
        v.update(x, n=n)
    assert str(v) == '4.00 4.67 4.38 8.00 4.00'  # window [8, 2, 4]; global (1 + 16 + 2 + 16) / 8
    assert (v.count, v.total) == (8, 35.0)
    assert str(SmoothedValue(fmt='{global_avg:.1f}')) == '0.0'  # an empty meter prints what its format needs


def _sync_worker(rank, init_file, results):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        ml = MetricLogger()
        for x in range(rank + 1):  # rank 0: [10]; rank 1: [10, 11]
            ml.meters['acc1'].update(10.0 + x, n=2)
        ml.synchronize_between_processes()
        results[rank] = (ml.acc1.count, ml.acc1.total, ml.acc1.global_avg, list(ml.acc1.window))
    finally:
        dist.destroy_process_group()


def test_synchronize_between_processes_sums_count_and_total(tmp_path):
    import torch.multiprocessing as mp
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sync_worker, args=(str(tmp_path / 'init'), results), nprocs=2)
        results = dict(results)
    assert results[0][:3] == results[1][:3] == (6, 62.0, 62.0 / 6)
    assert results[0][3] == [10.0] and results[1][3] == [10.0, 11.0]  # windows stay per rank


def test_distillation_loss_against_direct_formulas():
    from shared.losses import DistillationLoss
    g = torch.Generator().manual_seed(0)
    teacher = torch.nn.Linear(6, 5)
    x, y = torch.randn(4, 6, generator=g), torch.randint(0, 5, (4,), generator=g)
    cls_out, dist_out = torch.randn(4, 5, generator=g) * 2, torch.randn(4, 5, generator=g) * 2
    ce = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        t = teacher(x)
    base = ce(cls_out, y)
    # KL(teacher || student) at temperature 2, summed and divided by the 20 logits, times 4
    p_t, log_p_s = (t / 2).softmax(1), (dist_out / 2).log_softmax(1)
    soft = (p_t * (p_t.log() - log_p_s)).sum() / 20 * 4
    hard = torch.nn.functional.cross_entropy(dist_out, t.argmax(1))
    assert torch.equal(DistillationLoss(ce, teacher, 'none', 0.3, 2.0)(x, (cls_out, dist_out), y), base)
    torch.testing.assert_close(DistillationLoss(ce, teacher, 'soft', 0.3, 2.0)(x, (cls_out, dist_out), y),
                               0.7 * base + 0.3 * soft)
    torch.testing.assert_close(DistillationLoss(ce, teacher, 'hard', 0.3, 2.0)(x, (cls_out, dist_out), y),
                               0.7 * base + 0.3 * hard)
    # a single output tensor is both the class and the distillation head
    torch.testing.assert_close(DistillationLoss(ce, teacher, 'hard', 0.5, 1.0)(x, cls_out, y),
                               0.5 * base + 0.5 * torch.nn.functional.cross_entropy(cls_out, t.argmax(1)))
    with pytest.raises(ValueError, match='distillation type'):
        DistillationLoss(ce, teacher, 'medium', 0.5, 1.0)
