"""shared.datasets: each reader on a layout generated here, the transforms, the loaders, and layout errors."""
import argparse
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from shared.datasets import DatasetLayoutError, build_dataset, build_loaders, build_transform


def make_args(**kw):
    base = dict(data_set='DIGITS', data_path='', input_size=32, batch_size=8, num_workers=0, pin_mem=False,
                color_jitter=0.3, aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic', reprob=0.25,
                remode='pixel', recount=1, eval_crop_ratio=0.875, fake_size=12, fake_classes=3,
                inat_category='name', distributed=False, repeated_aug=True, dist_eval=False)
    base.update(kw)
    return argparse.Namespace(**base)


def write_jpg(path, color=(10, 20, 30), size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', size, color).save(path)


# ------------------------------------------------------------------ embedded / generated


def test_digits_split_and_shapes():
    args = make_args(input_size=40)
    train, nb = build_dataset(True, args)
    val, nb_val = build_dataset(False, args)
    assert nb == nb_val == 10
    assert (len(train), len(val)) == (1437, 360)
    img, label = val[0]
    assert img.shape == (3, 40, 40) and label == 0  # image 0 of load_digits is a 0, and index 0 is validation
    # the split is deterministic and disjoint: validation is every fifth image
    from sklearn.datasets import load_digits
    assert val.targets == [int(t) for t in load_digits().target[::5]]


def test_fake_is_deterministic():
    args = make_args(data_set='FAKE', input_size=24)
    ds, nb = build_dataset(False, args)
    assert nb == 3 and len(ds) == 12
    a, la = ds[5]
    b, lb = ds[5]
    assert la == lb and torch.equal(a, b) and a.shape == (3, 24, 24)


# ------------------------------------------------------------------ transforms


def test_transforms_follow_deit():
    big = make_args(input_size=224)
    names = [type(t).__name__ for t in build_transform(True, big).transforms]
    assert names[0] == 'RandomResizedCropAndInterpolation' and 'RandomErasing' in names
    ev = build_transform(False, big).transforms
    assert ev[0].size == 256 and ev[1].size == (224, 224)
    small = make_args(input_size=32)
    assert type(build_transform(True, small).transforms[0]).__name__ == 'RandomCrop'
    assert [type(t).__name__ for t in build_transform(False, small).transforms] == ['ToTensor', 'Normalize']


# ------------------------------------------------------------------ IMNET, CIFAR, iNat


def test_imagenet_folders(tmp_path):
    for split, n in (('train', 3), ('val', 2)):
        for wnid in ('n01', 'n02'):
            for i in range(n):
                write_jpg(str(tmp_path / split / wnid / f'{i}.JPEG'))
    args = make_args(data_set='IMNET', data_path=str(tmp_path), input_size=48)
    train, nb = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert nb == 1000  # DeiT's fixed ImageNet head
    assert len(train) == 6 and len(val) == 4 and train.classes == ['n01', 'n02']
    assert train[5][1] == 1


def _class_folders(root, split_classes):
    """split name -> class names; two images per class, the first pixel value encoding the class."""
    for split, classes in split_classes.items():
        for c in classes:
            for i in range(2):
                write_jpg(str(root / split / c / f'{i}.JPEG'), color=(40 * (ord(c) - ord('a')), 0, 0), size=(4, 4))
    return make_args(data_set='IMNET', data_path=str(root), input_size=8)


def test_imagenet_val_uses_the_training_class_indices(tmp_path, capsys):
    args = _class_folders(tmp_path, {'train': 'abc', 'val': 'ac'})
    train, nb_train = build_dataset(True, args)
    capsys.readouterr()
    val, nb_val = build_dataset(False, args)
    assert 'no folder for 1 of the 3 training classes (b)' in capsys.readouterr().out
    labels = {os.path.basename(os.path.dirname(p)): t for p, t in val.samples}
    assert labels == {'a': 0, 'c': 2} == {c: train.class_to_idx[c] for c in 'ac'}  # c keeps index 2, not 1
    assert val.classes == ['a', 'b', 'c'] and nb_val == nb_train == 1000 and len(val) == 4
    assert sorted(t for _, t in val.samples) == [0, 0, 2, 2]


def test_imagenet_val_class_unknown_to_training_stops(tmp_path):
    args = _class_folders(tmp_path, {'train': 'abc', 'val': 'abcd'})
    with pytest.raises(DatasetLayoutError, match=r'class folder\(s\) d not among the 3 classes'):
        build_dataset(False, args)
    assert len(build_dataset(True, args)[0]) == 6  # the training split alone is unaffected


def test_imagenet_val_complete_or_without_train_split(tmp_path, capsys):
    args = _class_folders(tmp_path / 'full', {'train': 'abc', 'val': 'abc'})
    val, _ = build_dataset(False, args)
    assert [t for _, t in val.samples] == [0, 0, 1, 1, 2, 2] and capsys.readouterr().out == ''
    args = _class_folders(tmp_path / 'evalonly', {'val': 'ac'})
    val, _ = build_dataset(False, args)  # nothing to align with: val's own folders, and a line saying so
    assert [t for _, t in val.samples] == [0, 0, 1, 1] and 'train not found' in capsys.readouterr().out
    (tmp_path / 'full' / 'val' / 'e').mkdir()
    (tmp_path / 'full' / 'train' / 'e').mkdir()
    write_jpg(str(tmp_path / 'full' / 'train' / 'e' / '0.JPEG'))
    with pytest.raises(DatasetLayoutError, match=r'no images in class folder\(s\) e'):
        build_dataset(False, make_args(data_set='IMNET', data_path=str(tmp_path / 'full'), input_size=8))


def _write_pickle(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        pickle.dump(obj, f)


def test_cifar100_and_cifar10(tmp_path):
    rng = np.random.default_rng(0)
    _write_pickle(str(tmp_path / 'cifar-100-python' / 'train'),
                  {'data': rng.integers(0, 255, (5, 3072), dtype=np.uint8), 'fine_labels': [0, 99, 3, 4, 5],
                   'coarse_labels': [0] * 5})
    _write_pickle(str(tmp_path / 'cifar-100-python' / 'test'),
                  {'data': rng.integers(0, 255, (2, 3072), dtype=np.uint8), 'fine_labels': [7, 8],
                   'coarse_labels': [0] * 2})
    for i in range(1, 6):
        _write_pickle(str(tmp_path / 'cifar-10-batches-py' / f'data_batch_{i}'),
                      {'data': rng.integers(0, 255, (2, 3072), dtype=np.uint8), 'labels': [i, 9]})
    _write_pickle(str(tmp_path / 'cifar-10-batches-py' / 'test_batch'),
                  {'data': rng.integers(0, 255, (3, 3072), dtype=np.uint8), 'labels': [1, 2, 3]})
    args = make_args(data_set='CIFAR', data_path=str(tmp_path))
    train, nb = build_dataset(True, args)
    assert nb == 100 and len(train) == 5 and train[1][1] == 99 and train[1][0].shape == (3, 32, 32)
    assert len(build_dataset(False, args)[0]) == 2
    args.data_set = 'CIFAR10'
    train, nb = build_dataset(True, args)
    assert nb == 10 and len(train) == 10 and train.targets[:4] == [1, 9, 2, 9]
    assert build_dataset(False, args)[0].targets == [1, 2, 3]


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ('touch ' + str(tmp_path / 'pwned'),))
    _write_pickle(str(tmp_path / 'cifar-100-python' / 'train'), {'data': Evil(), 'fine_labels': [0]})
    with pytest.raises(DatasetLayoutError, match='CIFAR'):
        build_dataset(True, make_args(data_set='CIFAR', data_path=str(tmp_path)))
    assert not (tmp_path / 'pwned').exists()


def test_inat_json_layout(tmp_path):
    # categories.json is indexed by category id; file names are <dir>/<super>/<category id>/<file>
    categories = [{'id': 0, 'name': 'a', 'genus': 'g1'}, {'id': 1, 'name': 'b', 'genus': 'g1'},
                  {'id': 2, 'name': 'c', 'genus': 'g2'}]
    def split(files_cats):
        return {'images': [{'id': i, 'file_name': f'train_val2018/Plantae/{c}/{f}'}
                           for i, (f, c) in enumerate(files_cats)],
                'annotations': [{'image_id': i, 'category_id': c} for i, (_, c) in enumerate(files_cats)]}
    train = [('x1.jpg', 2), ('x2.jpg', 0), ('x3.jpg', 1)]
    val = [('y1.jpg', 1)]
    for name, obj in (('train2018.json', split(train)), ('val2018.json', split(val)), ('categories.json', categories)):
        (tmp_path / name).write_text(json.dumps(obj))
    for f, c in train + val:
        write_jpg(str(tmp_path / 'train_val2018' / str(c) / f))
    args = make_args(data_set='INAT', data_path=str(tmp_path), input_size=48)
    ds, nb = build_dataset(True, args)
    assert nb == 3 and [t for _, t in ds.samples] == [0, 1, 2]  # first-appearance order: c, a, b
    ds_val, _ = build_dataset(False, args)
    assert ds_val.samples[0][1] == 2 and ds_val[0][0].shape == (3, 48, 48)
    args.inat_category = 'genus'
    ds, nb = build_dataset(True, args)
    assert nb == 2 and [t for _, t in ds.samples] == [0, 1, 1]


# ------------------------------------------------------------------ errors


def test_missing_path_and_wrong_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match='is not a directory'):
        build_dataset(True, make_args(data_set='IMNET', data_path=str(tmp_path / 'nope')))
    with pytest.raises(DatasetLayoutError, match=str(tmp_path / 'train')):
        build_dataset(True, make_args(data_set='IMNET', data_path=str(tmp_path)))
    (tmp_path / 'train').mkdir()
    with pytest.raises(DatasetLayoutError, match='sub-folder'):
        build_dataset(True, make_args(data_set='IMNET', data_path=str(tmp_path)))
    with pytest.raises(DatasetLayoutError, match='cifar-100-python'):
        build_dataset(True, make_args(data_set='CIFAR', data_path=str(tmp_path)))
    with pytest.raises(DatasetLayoutError, match='unknown --data-set'):
        build_dataset(True, make_args(data_set='MNIST', data_path=str(tmp_path)))
    assert issubclass(DatasetLayoutError, ValueError)


# ------------------------------------------------------------------ loaders


def test_loaders_single_process():
    args = make_args(data_set='FAKE', input_size=16, batch_size=5)
    train, _ = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    lt, lv = build_loaders(args, train, val)
    assert isinstance(lt.sampler, torch.utils.data.RandomSampler) and lt.drop_last and len(lt) == 2
    assert isinstance(lv.sampler, torch.utils.data.SequentialSampler) and lv.batch_size == 7 and len(lv) == 2


def test_loaders_distributed_samplers(monkeypatch):
    import shared.distributed as d
    from shared.samplers import RASampler
    monkeypatch.setattr(d, 'get_world_size', lambda: 2)
    monkeypatch.setattr(d, 'get_rank', lambda: 1)
    args = make_args(data_set='FAKE', input_size=16, batch_size=2, distributed=True)
    train, _ = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    lt, lv = build_loaders(args, train, val)
    assert isinstance(lt.sampler, RASampler) and lt.sampler.rank == 1
    assert isinstance(lv.sampler, torch.utils.data.SequentialSampler)
    args.repeated_aug, args.dist_eval = False, True
    lt, lv = build_loaders(args, train, val)
    assert type(lt.sampler) is torch.utils.data.DistributedSampler
    assert type(lv.sampler) is torch.utils.data.DistributedSampler and not lv.sampler.shuffle


# ------------------------------------------------------------------ fine-grained layouts


def _cub_style(base, entries):
    """entries: (image id, relative path, class id, is_train); writes the three metadata files and the images."""
    (base / 'images.txt').parent.mkdir(parents=True, exist_ok=True)
    (base / 'images.txt').write_text(''.join(f'{i} {p}\n' for i, p, _, _ in entries))
    (base / 'image_class_labels.txt').write_text(''.join(f'{i} {c}\n' for i, _, c, _ in entries))
    (base / 'train_test_split.txt').write_text(''.join(f'{i} {t}\n' for i, _, _, t in entries))
    for _, p, _, _ in entries:
        write_jpg(str(base / 'images' / p))


@pytest.mark.parametrize('parent_level', [True, False])  # ToCom passes the parent folder, TAVT the folder itself
def test_cub(tmp_path, parent_level):
    base = tmp_path / 'CUB_200_2011'
    _cub_style(base, [(1, '001.Black_footed_Albatross/a.jpg', 1, 1), (2, '001.Black_footed_Albatross/b.jpg', 1, 0),
                      (3, '200.Common_Yellowthroat/c.jpg', 200, 1)])
    args = make_args(data_set='CUB', data_path=str(tmp_path if parent_level else base), input_size=48)
    train, nb = build_dataset(True, args)
    test, _ = build_dataset(False, args)
    assert nb == 200 and len(train) == 2 and len(test) == 1
    assert train.samples[1] == (str(base / 'images' / '200.Common_Yellowthroat/c.jpg'), 199)
    assert test.targets == [0] and train[1][0].shape == (3, 48, 48)


def test_nabirds_maps_sparse_ids_in_ascending_order(tmp_path):
    base = tmp_path / 'nabirds'
    _cub_style(base, [('aa-1', '0817/x.jpg', 817, 1), ('bb-2', '0295/y.jpg', 295, 1), ('cc-3', '1000/z.jpg', 1000, 0),
                      ('dd-4', '0295/w.jpg', 295, 0)])
    args = make_args(data_set='NABIRDS', data_path=str(tmp_path))
    train, nb = build_dataset(True, args)
    test, _ = build_dataset(False, args)
    assert nb == 555 and train.targets == [1, 0] and test.targets == [2, 0]


def _cars_annotations(files_classes):
    dtype = [('bbox_x1', 'O'), ('bbox_y1', 'O'), ('bbox_x2', 'O'), ('bbox_y2', 'O'), ('class', 'O'), ('fname', 'O')]
    return {'annotations': np.array([(1, 2, 30, 40, c, f) for f, c in files_classes], dtype=dtype)}


@pytest.mark.parametrize('layout', ['torchvision', 'transfg'])
def test_stanford_cars(tmp_path, layout):
    import scipy.io
    base = tmp_path / 'stanford_cars' if layout == 'torchvision' else tmp_path / 'car'
    (base / 'devkit').mkdir(parents=True)
    scipy.io.savemat(str(base / 'devkit' / 'cars_train_annos.mat'),
                     _cars_annotations([('00001.jpg', 1), ('00002.jpg', 196), ('00003.jpg', 5)]))
    test_mat = base / ('cars_test_annos_withlabels.mat' if layout == 'torchvision'
                       else 'devkit/cars_test_annos_withlabels.mat')
    scipy.io.savemat(str(test_mat), _cars_annotations([('00001.jpg', 7)]))
    scipy.io.savemat(str(base / 'devkit' / 'cars_meta.mat'),
                     {'class_names': np.array(['AM General Hummer SUV 2000'] * 196, dtype=object)})
    for split, n in (('cars_train', 3), ('cars_test', 1)):
        for i in range(1, n + 1):
            write_jpg(str(base / split / f'{i:05d}.jpg'))
    root = tmp_path if layout == 'torchvision' else base
    args = make_args(data_set='CARS', data_path=str(root), input_size=48)
    train, nb = build_dataset(True, args)
    test, _ = build_dataset(False, args)
    assert nb == 196 and train.targets == [0, 195, 4] and test.targets == [6]
    assert train.samples[1][0] == str(base / 'cars_train' / '00002.jpg') and test[0][0].shape == (3, 48, 48)


def test_stanford_dogs(tmp_path):
    import scipy.io
    base = tmp_path / 'StanfordDogs'
    train = [('n02085620-Chihuahua/n02085620_10074', 1), ('n02116738-African_hunting_dog/n02116738_1', 120)]
    test = [('n02085620-Chihuahua/n02085620_7', 1)]
    for name, entries in (('train_list.mat', train), ('test_list.mat', test)):
        base.mkdir(exist_ok=True)
        scipy.io.savemat(str(base / name), {
            'annotation_list': np.array([[n] for n, _ in entries], dtype=object),
            'file_list': np.array([[n + '.jpg'] for n, _ in entries], dtype=object),
            'labels': np.array([[float(l)] for _, l in entries])})
        for n, _ in entries:
            write_jpg(str(base / 'Images' / (n + '.jpg')))
    args = make_args(data_set='DOGS', data_path=str(tmp_path), input_size=48)
    ds, nb = build_dataset(True, args)
    assert nb == 120 and ds.targets == [0, 119] and len(build_dataset(False, args)[0]) == 1
    assert ds.samples[1][0] == str(base / 'Images' / 'n02116738-African_hunting_dog/n02116738_1.jpg')
    assert ds[1][0].shape == (3, 48, 48)


def test_flowers102(tmp_path):
    import scipy.io
    base = tmp_path / 'flowers-102'
    base.mkdir()
    scipy.io.savemat(str(base / 'imagelabels.mat'), {'labels': np.array([[77, 1, 102, 5, 5]])})
    scipy.io.savemat(str(base / 'setid.mat'), {'trnid': np.array([[1, 3]]), 'valid': np.array([[2]]),
                                                 'tstid': np.array([[4, 5]])})
    for i in range(1, 6):
        write_jpg(str(base / 'jpg' / f'image_{i:05d}.jpg'))
    args = make_args(data_set='FLOWERS', data_path=str(tmp_path), input_size=48)
    train, nb = build_dataset(True, args)
    test, _ = build_dataset(False, args)
    assert nb == 102 and train.targets == [76, 101] and test.targets == [4, 4]
    assert train.samples[1][0] == str(base / 'jpg' / 'image_00003.jpg')


def test_inat2017(tmp_path):
    imgs = [{'id': 7, 'file_name': 'train_val_images/Plantae/Sp_a/1.jpg'},
            {'id': 8, 'file_name': 'train_val_images/Aves/Sp_b/2.jpg'}]
    anns = [{'image_id': 7, 'category_id': 12}, {'image_id': 8, 'category_id': 5088}]
    (tmp_path / 'train2017.json').write_text(json.dumps({'images': imgs, 'annotations': anns}))
    (tmp_path / 'val2017.json').write_text(json.dumps({'images': imgs[:1], 'annotations': anns[:1]}))
    for im in imgs:
        write_jpg(str(tmp_path / im['file_name']))
    args = make_args(data_set='INAT2017', data_path=str(tmp_path), input_size=48)
    train, nb = build_dataset(True, args)
    assert nb == 5089 and train.targets == [12, 5088] and train[1][0].shape == (3, 48, 48)
    assert len(build_dataset(False, args)[0]) == 1


def test_fine_grained_layout_errors(tmp_path):
    for name, expected in (('CUB', 'images.txt'), ('CARS', 'devkit'), ('DOGS', 'train_list.mat'),
                           ('FLOWERS', 'setid.mat'), ('NABIRDS', 'images.txt'), ('INAT2017', 'train_val_images')):
        with pytest.raises(DatasetLayoutError, match=expected) as e:
            build_dataset(True, make_args(data_set=name, data_path=str(tmp_path)))
        assert str(tmp_path) in str(e.value)
    # a .mat without the expected entry names the entry and the file
    import scipy.io
    (tmp_path / 'flowers-102' / 'jpg').mkdir(parents=True)
    scipy.io.savemat(str(tmp_path / 'flowers-102' / 'setid.mat'), {'trainid': np.array([[1]])})
    with pytest.raises(DatasetLayoutError, match="setid.mat: no 'trnid' entry"):
        build_dataset(True, make_args(data_set='FLOWERS', data_path=str(tmp_path)))


def test_three_augment(tmp_path):
    args = make_args(input_size=48, ThreeAugment=True, src=False)
    names = [type(t).__name__ for t in build_transform(True, args).transforms]
    assert names == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', '_OneOf3Augment', 'ColorJitter',
                     'ToTensor', 'Normalize']
    args.src, args.color_jitter = True, 0.0
    t = build_transform(True, args)
    assert [type(x).__name__ for x in t.transforms][:3] == ['Resize', 'RandomCrop', 'RandomHorizontalFlip']
    assert t.transforms[1].padding_mode == 'reflect' and 'ColorJitter' not in [type(x).__name__ for x in t.transforms]
    assert t(Image.new('RGB', (60, 50), (200, 10, 10))).shape == (3, 48, 48)
    assert [type(x).__name__ for x in build_transform(False, args).transforms][0] == 'Resize'  # eval unchanged
