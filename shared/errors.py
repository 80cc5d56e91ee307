"""The project's one error boundary.

Every mistake a user can make (a flag, a file, a data layout, a checkpoint, an output folder in use) raises a
`UserError` whose message says what is wrong, which flag or file, and what to do. Entry scripts and tools run their
`main` through `run_cli`, which prints that message as one `error: ...` line on stderr and exits with status 2 (as argparse
does for a bad flag; 1 when a run diverged), without a traceback. VIT_DEBUG=1 in the environment shows the traceback instead.
"""
import os
import sys


class UserError(Exception):
    """A problem with the user's input, reported as one line (no traceback)."""


class TrainingDiverged(UserError):
    """The loss or the weights became NaN/Inf; nothing of the broken state was saved."""


def _user_error_types():
    # DatasetLayoutError predates this module and is a FileNotFoundError; it is a user error all the same.
    from shared.datasets import DatasetLayoutError
    return (UserError, DatasetLayoutError)


def debug_requested():
    return os.environ.get('VIT_DEBUG', '') not in ('', '0')


def run_cli(main, *args, **kwargs):
    """Call main(*args, **kwargs); a UserError (or a data layout error) becomes one `error: <message>` line."""
    if debug_requested():
        return main(*args, **kwargs)
    try:
        return main(*args, **kwargs)
    except _user_error_types() as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(e, TrainingDiverged) else 2)

