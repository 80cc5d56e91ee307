"""compression_rate.json: the searched (prune, merge) kept-number schedules, keyed by display name and target.

Format (the reference's, kept unchanged): {display name: {str(float target): {"prune_kept_num": "<list literal>",
"merge_kept_num": "<list literal>"}}}; the lists are strings, CAFormer's prune list is the string "None".
"""
import ast
import json
import os

SHIPPED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'compression_rate.json')

# CLI model name -> display name in compression_rate.json (the reference's table: DeiT-T/S/B, MAE-B/L/H, CAFormer)
MODEL_KEYS = {
    **{f'vit_deit_{size}_patch16_224': f'ViT-{size[0].upper()}-DeiT' for size in ('tiny', 'small', 'base')},
    **{f'vit_{size}_patch{patch}_mae': f'ViT-{size[0].upper()}-MAE'
       for size, patch in (('base', 16), ('large', 16), ('huge', 14))},
    'caformer_s36': 'CAFormer-S36',
}


class ScheduleNotFoundError(KeyError):
    def __str__(self):
        return self.args[0]


def resolve_path(path=None):
    """The reference opens ./compression_rate.json; use it when present, else the copy shipped with diffrate/."""
    if path:
        return path
    return 'compression_rate.json' if os.path.isfile('compression_rate.json') else SHIPPED_PATH


def read_table(path=None):
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'compression rate file {path!r} does not exist')
    with open(path) as f:
        return json.load(f)


def target_key(target_flops):
    return str(float(target_flops))


def available(table):
    return ', '.join(f'{name}: {sorted(entries, key=float)}' for name, entries in table.items())


def _parse_list(text):
    value = ast.literal_eval(text) if isinstance(text, str) else text
    return None if value is None else [int(v) for v in value]


def lookup(model, target_flops, path=None):
    """(prune_kept or None, merge_kept) for `--model` and `--target_flops`; an absent pair names those that exist."""
    table = read_table(path)
    if model not in MODEL_KEYS:
        raise ScheduleNotFoundError(
            f'model {model!r} has no entry in compression_rate.json; models with schedules: {", ".join(MODEL_KEYS)}')
    name, key = MODEL_KEYS[model], target_key(target_flops)
    if name not in table or key not in table[name]:
        raise ScheduleNotFoundError(
            f'compression_rate.json does not contain {name} ({model}) with {key}G flops; '
            f'available (model: targets): {available(table)}')
    entry = table[name][key]
    return _parse_list(entry['prune_kept_num']), _parse_list(entry['merge_kept_num'])


def entry(prune_kept, merge_kept):
    """One leaf in the file's format (lists written as strings)."""
    return {'prune_kept_num': 'None' if prune_kept is None else str([int(v) for v in prune_kept]).replace(' ', ''),
            'merge_kept_num': str([int(v) for v in merge_kept]).replace(' ', '')}


def write_entry(path, model, target_flops, prune_kept, merge_kept):
    """Add (or replace) one schedule in a compression_rate.json-format file, creating it if needed."""
    table = read_table(path) if os.path.isfile(path) else {}
    table.setdefault(MODEL_KEYS.get(model, model), {})[target_key(target_flops)] = entry(prune_kept, merge_kept)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(table, f, indent=4)
    os.replace(tmp, path)
    return table


def all_schedules(path=None):
    """Every (model, target string, prune, merge) in the file, for tests and tools."""
    table = read_table(path)
    names = {v: k for k, v in MODEL_KEYS.items()}
    for name, entries in table.items():
        for key, leaf in entries.items():
            yield names[name], key, _parse_list(leaf['prune_kept_num']), _parse_list(leaf['merge_kept_num'])
