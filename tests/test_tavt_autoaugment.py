"""TAVT's AutoAugment (the DeepVoltaire port's ImageNet policy): its grids, its operations against direct PIL
calls, and where the data pipeline uses it."""
import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from tavt import autoaugment
from tavt.autoaugment import IMAGENET_POLICY, ImageNetAutoAugment, magnitude


def _image(h=40, w=56):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_policy_table_and_grids():
    assert len(IMAGENET_POLICY) == 24
    assert all(len(sub) == 2 and all(0 <= p <= 1 and 0 <= i <= 9 for p, _, i in sub) for sub in IMAGENET_POLICY)
    assert [magnitude('posterize', i) for i in range(10)] == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    for op, (lo, hi) in (('rotate', (0, 30)), ('solarize', (256, 0)), ('shearX', (0, 0.3)), ('color', (0, 0.9))):
        assert [magnitude(op, i) for i in range(10)] == pytest.approx(list(np.linspace(lo, hi, 10)))
    assert magnitude('equalize', 5) == 0


def test_steps_equal_direct_pil_calls(monkeypatch):
    """Every coin says yes, every sign is +1: sub-policies 0, 16 and 18 are the PIL calls the original makes."""
    monkeypatch.setattr(autoaugment.random, 'random', lambda: 0.0)
    monkeypatch.setattr(autoaugment.random, 'choice', lambda seq: 1)
    aug, img = ImageNetAutoAugment(), _image()
    # 0: posterize to 4 bits, then rotate 30 degrees counter-clockwise onto grey
    posterized = ImageOps.posterize(img, 4)
    rotated = posterized.convert('RGBA').rotate(30.)
    expected = Image.composite(rotated, Image.new('RGBA', rotated.size, (128,) * 4), rotated).convert('RGB')
    out = aug.apply(img, 0)
    assert out.tobytes() == expected.tobytes()
    assert out.getpixel((0, 0)) == (128, 128, 128)  # a corner rotated in from outside
    # 16: colour factor 1 + 0.8, then solarize above 256 * 2 / 9
    expected = ImageOps.solarize(ImageEnhance.Color(img).enhance(1.8), 256 * 2 / 9)
    assert aug.apply(img, 16).tobytes() == expected.tobytes()
    # 18: shear x by +0.1666 (bicubic, grey fill), then equalize
    sheared = img.transform(img.size, Image.AFFINE, (1, 0.5 / 3, 0, 0, 1, 0), Image.BICUBIC, fillcolor=(128,) * 3)
    assert aug.apply(img, 18).tobytes() == ImageOps.equalize(sheared).tobytes()


def test_coins_and_choice_follow_python_random():
    aug, img = ImageNetAutoAugment(), _image()
    random.seed(2)  # draws sub-policy 1 (solarize 5, autocontrast), then coins 0.09 and 0.36: both steps run
    assert random.randint(0, 23) == 1 and [random.random() < 0.6 for _ in range(2)] == [True, True]
    random.seed(2)
    expected = ImageOps.autocontrast(ImageOps.solarize(img, 256 * 4 / 9))
    assert aug(img).tobytes() == expected.tobytes()
    # over many draws every sub-policy is used
    random.seed(0)
    seen = set()
    original = ImageNetAutoAugment.apply
    ImageNetAutoAugment.apply = lambda self, im, i: seen.add(i) or im
    try:
        for _ in range(400):
            aug(img)
    finally:
        ImageNetAutoAugment.apply = original
    assert seen == set(range(24))


def test_pipeline_uses_it_for_cars_and_inat_only():
    from tavt.data_utils import build_transforms
    for dataset, used in (('car', True), ('INat2017', True), ('CUB_200_2011', False), ('dog', False)):
        train, test = build_transforms(dataset)
        assert any(isinstance(t, ImageNetAutoAugment) for t in train.transforms) == used
        assert not any(isinstance(t, ImageNetAutoAugment) for t in test.transforms)
    train, _ = build_transforms('car', img_size=32)
    random.seed(0)
    shapes = {tuple(train(_image(50, 70)).shape) for _ in range(30)}  # every sub-policy keeps size and mode
    assert shapes == {(3, 32, 32)}
