"""The papers' setting for tools/compare.py: ImageNet-1k with the official weights.

`python tools/compare.py --preset deit_small_imagenet --weights-dir DIR --data-path IMAGENET` fills the comparison's
flags (backbone, input size, the baseline weights and each method's artefact) from a `Preset`, after checking that
every file it needs is in DIR. A missing file is named together with its expected path and where to get it, all
missing files in one message; a file whose name carries a SHA-256 prefix (DeiT's `name-<hex>.pth`, the convention of
torch.hub's hash check) must hash to that prefix.

Each preset also carries the numbers the papers (or the official READMEs) report, so that compare can print them next
to what it measures. Only numbers found in the official repositories, their READMEs or the papers' listings are
here, each with its source; a setting no source reports has no reference (`paper_reference` returns None).

What a preset cannot download: ToCom never released its compensator and ToE released no trained model, so those
methods run only when the user made the file (the message gives the command); they join the default method list
when their file is in DIR. TAVT is a fine-grained method (CUB, NABirds, ...) and has no ImageNet preset.

How compare uses it: the method list decides which flags the parser gets, so without --methods it takes
`default_methods(PRESETS[name], weights_dir)` before building the parser; after parsing, `apply_preset(args, parser)`
fills the flags (`args.model_kwargs` holds the backbone's extra timm kwargs, MAE's average pooling); at the end
`paper_reference(name, row)` gives the reported numbers of each result row.
"""
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from shared.errors import UserError
from shared.provenance import file_sha256

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEIT_README = 'https://github.com/facebookresearch/deit/blob/main/README_deit.md'
AVIT_WEIGHTS = ('https://drive.google.com/file/d/1Fk_PzkEVs21Fv2ofCkmRL-CQRiGmPmxV/view (a-vit-weights.tar.gz from the '
                'A-ViT README; extract it and take a-vit-weights/{name})')

# torch.hub's convention: the hex digits after the last '-' of a file name start the file's SHA-256
_HASH_IN_NAME = re.compile(r'-([0-9a-f]{8,64})\.[A-Za-z0-9]+$')


@dataclass(frozen=True)
class WeightFile:
    arg: str            # the compare flag's dest it fills: checkpoint, avit_checkpoint, toe_checkpoint, tocom_path
    name: str           # file name expected in --weights-dir
    source: str         # where to download it, or the command that makes it when nothing was released
    method: str = 'baseline'   # the method that needs it

    @property
    def released(self):
        """True when the file is an official download, False when the user has to make it."""
        return self.source.startswith('http')


@dataclass(frozen=True)
class Reference:
    """A reported number: top-1 (%) and GFLOPs (MACs) of one method's setting, with its source."""
    method: str
    match: dict          # the setting: keys of the row's `settings` (or `k=v` in its label), or 'weights_file'
    acc1: Optional[float]
    gflops: Optional[float]
    source: str
    note: str = ''       # how the reported setting differs from what compare measures, if it does


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: str                       # timm model name of the backbone
    baseline: WeightFile
    methods: tuple                   # methods whose files are released or shipped (the default list)
    optional: tuple = ()             # WeightFiles of methods the user must make (ToCom, ToE)
    artefacts: tuple = ()            # released WeightFiles of the default methods (A-ViT's checkpoint)
    model_kwargs: dict = field(default_factory=dict)   # beyond timm's defaults for `model` (MAE's pooling)
    input_size: int = 224
    tome_r: tuple = (8, 13, 16)
    diffrate_key: Optional[str] = None   # the model's key in compression_rate.json
    references: tuple = ()

    def files(self, methods):
        """The weight files `methods` need, the baseline first."""
        return [self.baseline] + [f for f in self.artefacts + self.optional if f.method in methods]


def _deit_file(size, hash_prefix):
    name = f'deit_{size}_patch16_224-{hash_prefix}.pth'
    return WeightFile('checkpoint', name, f'https://dl.fbaipublicfiles.com/deit/{name}')


def _tocom_file(model):
    return WeightFile('tocom_path', f'tocom_{model}.pth', method='tocom', source=(
        'no released compensator (the ToCom README says "To be uploaded"); pre-train one: torchrun '
        f'--nproc_per_node=8 tocom/main.py --model {model}_tocom --data-path IMAGENET --output_dir OUT --epochs 10 '
        f'--finetune {{checkpoint}} --warmup-epochs 0 --distillation-type soft --distillation-alpha 1.0 '
        f'--teacher-model {model} --teacher-path {{checkpoint}} --lr 1e-3 --r_src -1, then copy OUT/checkpoint.pth'))


# compare prints a reference's source next to its row; the ToMe numbers are of another setting, and the source says so
_TOME_TRAINED = ('the paper trains DeiT-S with ToMe at this r; the off-the-shelf DeiT-S weights compare evaluates '
                 'are expected to land lower')
_TOME_SOURCE = ('ToMe paper (arXiv 2210.09461) as its Papers-with-Code page lists it, DeiT-S trained with ToMe at this '
                'r (r=13 agrees with the ToMe README: deit_S_r13 79.36)')
_TOME_TRAINED_T = _TOME_TRAINED.replace('DeiT-S', 'DeiT-T')
_TOME_SOURCE_T = ('ToMe paper (arXiv 2210.09461) as its Papers-with-Code page lists it, DeiT-T trained with ToMe at '
                  'this r (the ToMe README: deit_T_r13 71.27)')


def _diffrate_reference(target, acc1, gflops):
    return Reference('diffrate', {'target_flops': target}, acc1, gflops,
                     'DiffRate README (--eval --load_compression_rate, off-the-shelf weights)')


PRESETS = {p.name: p for p in (
    Preset(
        name='deit_tiny_imagenet',
        description='DeiT-T on ImageNet-1k: ToMe off the shelf, DiffRate\'s searched schedules, A-ViT-T',
        model='deit_tiny_patch16_224',
        baseline=_deit_file('tiny', 'a1311bcf'),
        methods=('tome', 'diffrate', 'avit'),
        artefacts=(WeightFile('avit_checkpoint', 'tiny-10-30.pth', AVIT_WEIGHTS.format(name='tiny-10-30.pth'),
                              method='avit'),),
        optional=(_tocom_file('deit_tiny_patch16_224'),),
        tome_r=(8, 12, 16),
        diffrate_key='ViT-T-DeiT',
        references=(
            Reference('baseline', {}, 72.202, None, 'DeiT README_deit.md (evaluation log of the released weights)'),
            Reference('tome', {'r': 8}, 71.7, 0.9, _TOME_SOURCE_T, _TOME_TRAINED_T),
            Reference('tome', {'r': 12}, 71.4, 0.8, _TOME_SOURCE_T, _TOME_TRAINED_T),
            Reference('tome', {'r': 16}, 70.7, 0.6, _TOME_SOURCE_T, _TOME_TRAINED_T),
            Reference('avit', {'weights_file': 'tiny-10-30.pth'}, 71.4, 0.8,
                      'A-ViT README (released A-ViT-T, tiny-10-30.pth)'),
        )),
    Preset(
        name='deit_small_imagenet',
        description='DeiT-S on ImageNet-1k: ToMe off the shelf, DiffRate\'s searched schedules, A-ViT-S',
        model='deit_small_patch16_224',
        baseline=_deit_file('small', 'cd65a155'),
        methods=('tome', 'diffrate', 'avit'),
        artefacts=(WeightFile('avit_checkpoint', 'small-10-75.pth', AVIT_WEIGHTS.format(name='small-10-75.pth'),
                              method='avit'),),
        optional=(_tocom_file('deit_small_patch16_224'),
                  WeightFile('toe_checkpoint', 'toe_deit_small_patch16_224.pth', method='toe', source=(
                      'no released ToE model; train one (300 epochs): torchrun --nproc_per_node=4 toe/deit/main.py '
                      '--patch-size 16 --model deit_small_patch16_224 --batch-size 256 --data-path IMAGENET '
                      '--output_dir OUT --seed 3407 --expansion-step 0 100 200 --keep-rate 0.5 0.75 1.0 '
                      '--initialization-keep-rate 0.25 --expansion-multiple-stage 2, then copy OUT/checkpoint.pth'))),
        diffrate_key='ViT-S-DeiT',
        references=(
            Reference('baseline', {}, 79.854, None, 'DeiT README_deit.md (evaluation log of the released weights)'),
            Reference('tome', {'r': 8}, 79.7, 3.4, _TOME_SOURCE, _TOME_TRAINED),
            Reference('tome', {'r': 13}, 79.4, 2.7, _TOME_SOURCE, _TOME_TRAINED),
            Reference('tome', {'r': 16}, 79.1, 2.3, _TOME_SOURCE, _TOME_TRAINED),
            _diffrate_reference(2.9, 79.538, 2.905),
            Reference('avit', {'weights_file': 'small-10-75.pth'}, 78.8, 3.6,
                      'A-ViT README (released A-ViT-S, small-10-75.pth)'),
        )),
    Preset(
        name='deit_base_imagenet',
        description='DeiT-B on ImageNet-1k: ToMe off the shelf, DiffRate\'s searched schedules (ToCom with your '
                    'compensator)',
        model='deit_base_patch16_224',
        baseline=_deit_file('base', 'b5f2ef4d'),
        methods=('tome', 'diffrate'),
        optional=(_tocom_file('deit_base_patch16_224'),),
        diffrate_key='ViT-B-DeiT',
        references=(
            Reference('baseline', {}, 81.846, None, 'DeiT README_deit.md (evaluation log of the released weights)'),
            _diffrate_reference(11.5, 81.498, 11.517),
        )),
    Preset(
        name='mae_base_imagenet',
        description='MAE ViT-B (fine-tuned) on ImageNet-1k: ToMe off the shelf, DiffRate\'s searched schedules',
        model='vit_base_patch16_224',
        # MAE's fine-tuned classifier averages the patch tokens through fc_norm (no final norm)
        model_kwargs={'global_pool': 'avg', 'fc_norm': True},
        baseline=WeightFile('checkpoint', 'mae_finetuned_vit_base.pth',
                            'https://dl.fbaipublicfiles.com/mae/finetune/mae_finetuned_vit_base.pth'),
        methods=('tome', 'diffrate'),
        diffrate_key='ViT-B-MAE',
        references=(
            _diffrate_reference(11.5, 82.864, 11.517),
        )),
)}


def hash_prefix(name):
    """The SHA-256 prefix a file name carries (`deit_small_patch16_224-cd65a155.pth` -> 'cd65a155'), or None."""
    found = _HASH_IN_NAME.search(name)
    return found.group(1) if found else None


def get_preset(name):
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise UserError(f"unknown --preset '{name}'; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _source_text(wanted, checkpoint):
    return wanted.source.replace('{checkpoint}', checkpoint)


def check_files(preset, weights_dir, methods):
    """{arg: path} of the files `methods` need; UserError naming every missing file (path and source) at once, or
    the first file whose SHA-256 does not start with the prefix its name carries."""
    checkpoint = os.path.join(weights_dir, preset.baseline.name)
    missing, found = [], {}
    for wanted in preset.files(methods):
        path = os.path.join(weights_dir, wanted.name)
        if os.path.isfile(path):
            found[wanted.arg] = path
        else:
            missing.append(f'{wanted.name} ({wanted.method}) expected at {path}; get it from: '
                           f'{_source_text(wanted, checkpoint)}')
    if missing:
        raise UserError(f'--preset {preset.name}: {len(missing)} file(s) missing in --weights-dir {weights_dir}: '
                        + '; '.join(f'[{i}] {m}' for i, m in enumerate(missing, 1)))
    for path in found.values():
        prefix = hash_prefix(os.path.basename(path))
        if prefix is not None:
            digest = file_sha256(path)
            if not digest.startswith(prefix):
                raise UserError(f'{path}: its SHA-256 {digest[:16]}... does not start with {prefix}, the prefix its '
                                'name carries; the file is corrupt or not the official one: download it again')
    return found


def diffrate_schedule(preset, cache_dir):
    """DiffRate's shipped schedules of the preset's backbone, in a compression_rate.json-format file keyed by the
    timm model name compare builds (the shipped file keys them by display name, e.g. 'ViT-S-DeiT'); returns
    (path, targets). The schedules are copied unchanged."""
    from diffrate import schedules  # DiffRate's searched schedules, the reference's file shipped unchanged
    table = schedules.read_table(schedules.SHIPPED_PATH)[preset.diffrate_key]
    out = os.path.join(cache_dir, 'presets', preset.name)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, 'compression_rate.json')
    with open(path, 'w') as f:
        json.dump({preset.model: table}, f, indent=1, sort_keys=True)
    return path, sorted(float(t) for t in table)


def _unset(args, dest, parser):
    """True when the user left `dest` alone: None/empty, or (given the parser) still the parser's default."""
    value = getattr(args, dest, None)
    if value in (None, '', [], ()):
        return True
    return parser is not None and value == parser.get_default(dest)


def default_methods(preset, weights_dir):
    """The preset's default methods, plus each optional method whose user-made file is already in `weights_dir`."""
    present = [f.method for f in preset.optional if os.path.isfile(os.path.join(weights_dir, f.name))]
    return list(preset.methods) + [m for m in present if m not in preset.methods]


def _refuse_conflicts(args, parser, preset, found):
    """A backbone flag the user gave that the preset would replace is an error, not silently overridden."""
    chosen = {'model': preset.model, 'input_size': preset.input_size, 'data_set': 'IMNET', **found}
    for dest, value in chosen.items():
        if parser is not None and not _unset(args, dest, parser) and getattr(args, dest) != value:
            flag = '--' + dest.replace('_', '-')
            raise UserError(f'{flag} {getattr(args, dest)} conflicts with --preset {preset.name}, which uses {value}; '
                            f'drop {flag} (or drop --preset and give every flag yourself)')


def apply_preset(args, parser=None):
    """Fill the parsed compare `args` from `args.preset` and the files in `args.weights_dir` (see the module
    docstring). With `parser`, a flag still at its parser default counts as not given and is filled too; flags the
    user gave are kept. Raises UserError when a file is missing or corrupt."""
    preset = get_preset(args.preset)
    weights_dir = getattr(args, 'weights_dir', None)
    if not weights_dir:
        raise UserError(f'--preset {preset.name} needs --weights-dir: the folder with '
                        + ', '.join(f.name for f in preset.files(preset.methods)))
    if not os.path.isdir(weights_dir):
        raise UserError(f'--weights-dir {weights_dir} is not a folder')
    if not getattr(args, 'data_path', ''):
        raise UserError(f'--preset {preset.name} needs --data-path: the ImageNet folder (train/ and val/ with one '
                        'sub-folder per class)')
    methods = getattr(args, 'methods', None)
    if _unset(args, 'methods', parser):
        methods = default_methods(preset, weights_dir)
    elif isinstance(methods, str):
        methods = [m.strip() for m in methods.split(',') if m.strip()]
    unsupported = [m for m in methods if m not in preset.methods + tuple(f.method for f in preset.optional)]
    if unsupported:
        raise UserError(f"--preset {preset.name} has no setting for {', '.join(unsupported)}; its methods: "
                        f"{', '.join(preset.methods + tuple(f.method for f in preset.optional))}")
    found = check_files(preset, weights_dir, methods)
    _refuse_conflicts(args, parser, preset, found)
    args.methods = ','.join(methods)
    args.data_set = 'IMNET'
    args.model = preset.model
    args.input_size = preset.input_size
    args.model_kwargs = dict(preset.model_kwargs)
    for dest, path in found.items():
        setattr(args, dest, path)
    if 'tome' in methods or 'tocom' in methods:
        if _unset(args, 'tome_r', parser):
            args.tome_r = list(preset.tome_r)
    if 'diffrate' in methods and _unset(args, 'diffrate_schedule_path', parser):
        cache_dir = getattr(args, 'cache_dir', None) or os.path.join(ROOT, '.cache', 'compare')
        args.diffrate_schedule_path, targets = diffrate_schedule(preset, cache_dir)
        if _unset(args, 'target_flops', parser):
            args.target_flops = targets
    return args


def _setting(row, key):
    """The row's value of a setting: from its settings dict, else from a `key=value` part of its label."""
    settings = row.get('settings') or {}
    if key in settings:
        return settings[key]
    for part in str(row.get('label', '')).replace(',', ' ').split():
        name, _, value = part.partition('=')
        if name == key:
            return value
    return None


def _same(a, b):
    try:
        return abs(float(a) - float(b)) < 1e-9
    except (TypeError, ValueError):
        return str(a) == str(b)


def _matches(reference, row):
    if row.get('method') != reference.method:
        return False
    for key, value in reference.match.items():
        if key == 'weights_file':
            names = {os.path.basename(w.get('path', '')) for w in (row.get('weights') or {}).values()}
            if value not in names:
                return False
        elif not _same(_setting(row, key), value):
            return False
    return True


def paper_reference(preset, row):
    """{'acc1', 'gflops', 'source', 'note'} the papers report for a compare result row (its 'method', 'settings',
    'label', 'weights'), or None when no source reports that setting."""
    for reference in get_preset(preset).references:
        if _matches(reference, row):
            return {'acc1': reference.acc1, 'gflops': reference.gflops, 'source': reference.source,
                    'note': reference.note}
    return None
