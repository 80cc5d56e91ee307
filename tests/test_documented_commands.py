"""Every command the documentation shows still parses, and the cheap ones run and print what the text says.

Commands are read from the fenced blocks and inline code of README.md, DEVELOPING.md and the method READMEs, and
from the tools' `--help` texts (their module docstrings). Each names an entry script; its arguments are parsed by
that script's own parser (a renamed or removed flag fails here), with the placeholders of the text (`$DATA`, `R`,
`...`) replaced by the table below. The FLOPs commands, whose numbers the text states, run in the fast suite; the
README's sweep runs on the embedded digits in the heavy suite.
"""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ('README.md', 'DEVELOPING.md', 'tocom/README.md', 'toe/README.md', 'diffrate/README.md', 'tavt/README.md',
        'avit/README.md', 'benchmarks/README.md')
TOOL_HELP = ('tools/compare.py', 'tools/flops.py', 'tools/benchmark.py', 'tools/convert.py', 'tools/train_baseline.py',
             'tools/submit.py', 'tools/export.py')
LAUNCHERS = ('python', 'python3', 'torchrun', 'srun')
# placeholder tokens of the text -> a value the parser accepts (paths stay as written: parsing does not read them)
PLACEHOLDERS = {'R': '8', 'k': '4', 't': '2', 'N': '1', '<k>': '4', '<t>': '2'}


def _parser(module, name='get_args_parser'):
    def build(argv):
        import importlib
        return getattr(importlib.import_module(module), name)()
    return build


def _compare_parser(argv):
    from tools import compare
    return compare.get_parser(compare.parse_methods(argv))


def _tool_parser(module):
    def build(argv):
        import importlib
        return importlib.import_module(module).get_parser(argv)
    return build


# entry script -> parser for its argv
PARSERS = {
    'tools/compare.py': _compare_parser,
    'tools/flops.py': _tool_parser('tools.flops'),
    'tools/benchmark.py': _tool_parser('tools.benchmark'),
    'tools/convert.py': _parser('tools.convert'),
    'tools/submit.py': _parser('tools.submit'),
    'tools/export.py': _parser('tools.export', 'get_parser'),
    'tools/train_baseline.py': _parser('tools.train_baseline'),
    'diffrate/main.py': _parser('diffrate.main'),
    'toe/deit/main.py': _parser('toe.deit.main'),
    'toe/lvvit/main.py': _parser('toe.lvvit.main'),
    'toe/EfficientTrain/main.py': _parser('toe.EfficientTrain.main'),
    'toe/EfficientTrain/ET_training.py': _parser('toe.EfficientTrain.ET_training'),
    'tocom/main.py': _parser('tocom.main'),
    'avit/main_act.py': _parser('avit.main_act'),
    'tavt/train.py': _parser('tavt.train'),
}


def shell_lines(text):
    """Lines of the fenced blocks (continuations joined) and inline code spans that start with a launcher."""
    blocks = re.findall(r'```[^\n]*\n(.*?)```', text, re.S)
    lines = [line for b in blocks for line in re.sub(r'\\\n\s*', ' ', b).splitlines()]
    # inline code names a script in prose when it has no arguments (`python tavt/train.py`): not a command
    lines += [c for c in re.findall(r'`([^`\n]+)`', re.sub(r'```.*?```', '', text, flags=re.S))
              if len(c.split()) > 2 or c.split()[0] != 'python']
    return [line.strip() for line in lines if line.strip().split(' ')[0] in LAUNCHERS]


def docstring_lines(path):
    import ast
    doc = ast.get_docstring(ast.parse((ROOT / path).read_text())) or ''
    doc = re.sub(r'\\\n\s*', ' ', doc)
    lines = [line.strip() for line in doc.splitlines() if line.strip().split(' ')[0] in LAUNCHERS]
    return lines + [c for c in re.findall(r'`([^`\n]+)`', doc) if c.split(' ')[0] in LAUNCHERS]


def script_and_argv(line):
    """(entry script, its arguments) of a documented command; None when it runs no entry script of ours."""
    line = line.split('  #')[0].split(' # ')[0]
    tokens = [t for t in shlex.split(line) if t != '...']
    scripts = [i for i, t in enumerate(tokens) if t in PARSERS]
    if not scripts:
        return None
    i = scripts[0]
    return tokens[i], [PLACEHOLDERS.get(t, t) for t in tokens[i + 1:]]


def documented_commands():
    found = []
    for doc in DOCS:
        found += [(doc, line) for line in shell_lines((ROOT / doc).read_text())]
    for tool in TOOL_HELP:
        found += [(f'{tool} --help', line) for line in docstring_lines(tool)]
    return [(where, line, *script_and_argv(line)) for where, line in found if script_and_argv(line)]


COMMANDS = documented_commands()


def test_the_documentation_shows_commands_of_every_method():
    scripts = {script for _, _, script, _ in COMMANDS}
    assert {'tools/compare.py', 'tools/flops.py', 'tools/benchmark.py', 'tools/convert.py', 'tocom/main.py',
            'diffrate/main.py', 'toe/deit/main.py', 'toe/lvvit/main.py', 'tavt/train.py'} <= scripts, scripts
    assert len(COMMANDS) >= 30


def parse(script, argv):
    """The script's own parse of argv; tools/submit.py's launcher flags, then the submitted script's."""
    if script == 'tools/submit.py':
        from tools.submit import entry_script, split_argv
        args, script_argv = split_argv(argv)
        return parse(entry_script(args.script), script_argv)
    return PARSERS[script](argv).parse_args(argv)


@pytest.mark.parametrize('where,line,script,argv', COMMANDS, ids=[f'{w}: {l[:60]}' for w, l, _, _ in COMMANDS])
def test_documented_command_parses(where, line, script, argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parse(script, argv)
    except SystemExit as e:
        pytest.fail(f'{where}: `{line}` does not parse any more (exit {e.code}): {err.getvalue().strip()[-800:]}')


# documented GFLOPs of the FLOPs commands, read from their comments: `# GFLOPs=8.772` or `# 2.447/3.503/4.599`
FLOPS_COMMANDS = [(w, line, argv) for w, line, script, argv in COMMANDS
                  if script == 'tools/flops.py' and re.search(r'#.*\d+\.\d{3}', line)]


@pytest.mark.parametrize('where,line,argv', FLOPS_COMMANDS, ids=[l[:70] for _, l, _ in FLOPS_COMMANDS])
def test_documented_flops_command_prints_the_documented_number(where, line, argv, capsys):
    from tools.flops import main
    documented = re.findall(r'\d+\.\d{3}', line.split('#', 1)[1])
    gflops = main(argv)
    printed = re.findall(r'\d+\.\d{3}', capsys.readouterr().out)
    # a per-stage command (ToE) prints one figure per stage before its last line
    assert f'{gflops:.3f}' == documented[-1] or set(documented) <= set(printed), (line, printed[-6:])


def test_flops_commands_with_numbers_are_found():
    assert len(FLOPS_COMMANDS) >= 4


@pytest.mark.heavy
def test_readme_sweep_runs(tmp_path):
    """The README's sweep, on the embedded digits with the smallest budgets (--quick), writes its table."""
    from tools import compare
    (line,) = [line for w, line, s, a in COMMANDS if w == 'README.md' and '--r 2 4 6' in line]
    argv = script_and_argv(line)[1] + ['--quick', '--no-plots', '--runs', '1', '--output-dir', str(tmp_path / 'o'),
                                       '--cache-dir', str(tmp_path / 'c')]
    rows = compare.main(argv)
    labels = {(r['method'], r['label']) for r in rows}
    for r in ('2', '4', '6'):
        assert any(m == 'tome' and r in label for m, label in labels), labels
    assert (tmp_path / 'o' / 'results.csv').exists()
