"""Test fixtures for TAVT: a random Google-layout .npz and a CUB_200_2011-layout image folder."""
import os

import numpy as np
from PIL import Image


def write_random_npz(path, hidden=32, heads=2, mlp=64, layers=12, patch=16, grid=2, num_classes=10, seed=0):
    """A ViT checkpoint in Google's npz layout (the keys and shapes the original's loader reads), random values."""
    rng = np.random.default_rng(seed)
    d = hidden // heads

    def r(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    arrays = {
        'embedding/kernel': r(patch, patch, 3, hidden), 'embedding/bias': r(hidden), 'cls': r(1, 1, hidden),
        'Transformer/posembed_input/pos_embedding': r(1, grid * grid + 1, hidden),
        'Transformer/encoder_norm/scale': 1 + r(hidden), 'Transformer/encoder_norm/bias': r(hidden),
        'head/kernel': r(hidden, num_classes), 'head/bias': r(num_classes),
        'pre_logits/kernel': r(hidden, hidden), 'pre_logits/bias': r(hidden),
    }
    for i in range(layers):
        b = f'Transformer/encoderblock_{i}/'
        a = b + 'MultiHeadDotProductAttention_1/'
        for n in ('query', 'key', 'value'):
            arrays[a + n + '/kernel'] = r(hidden, heads, d)
            arrays[a + n + '/bias'] = r(heads, d)
        arrays[a + 'out/kernel'] = r(heads, d, hidden)
        arrays[a + 'out/bias'] = r(hidden)
        for ln in ('LayerNorm_0', 'LayerNorm_2'):
            arrays[b + ln + '/scale'] = 1 + r(hidden)
            arrays[b + ln + '/bias'] = r(hidden)
        arrays[b + 'MlpBlock_3/Dense_0/kernel'] = r(hidden, mlp)
        arrays[b + 'MlpBlock_3/Dense_0/bias'] = r(mlp)
        arrays[b + 'MlpBlock_3/Dense_1/kernel'] = r(mlp, hidden)
        arrays[b + 'MlpBlock_3/Dense_1/bias'] = r(hidden)
    np.savez(path, **arrays)
    return arrays


def write_cub(root, classes=4, per_class=6, size=40, seed=0):
    """<root>/CUB_200_2011 with images.txt, image_class_labels.txt, train_test_split.txt and images/<class>/<f>.jpg;
    half of each class for training. Class c's images are tinted by c so that the task is learnable."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, 'CUB_200_2011')
    lines_img, lines_lab, lines_split = [], [], []
    k = 0
    for c in range(classes):
        folder = f'{c + 1:03d}.Class_{c + 1}'
        os.makedirs(os.path.join(base, 'images', folder), exist_ok=True)
        for j in range(per_class):
            k += 1
            pixels = rng.integers(0, 60, (size, size, 3))
            pixels[..., c % 3] += 60 * (1 + c // 3)
            name = f'{folder}/img_{j}.jpg'
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(base, 'images', name))
            lines_img.append(f'{k} {name}')
            lines_lab.append(f'{k} {c + 1}')
            lines_split.append(f'{k} {1 if j % 2 == 0 else 0}')
    for fname, lines in (('images.txt', lines_img), ('image_class_labels.txt', lines_lab),
                         ('train_test_split.txt', lines_split)):
        with open(os.path.join(base, fname), 'w') as f:
            f.write('\n'.join(lines) + '\n')
    return base
