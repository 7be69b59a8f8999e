"""Progress bars of the long commands (benchmarks, `tandem model init`): tqdm on stderr,
because stdout may carry `--json`. Shown only when stderr is a terminal (tqdm's
`disable=None`), so logs and pipes stay clean; TANDEM_PROGRESS=1 forces them on (a log that
wants them), TANDEM_PROGRESS=0 off."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from tqdm import tqdm


def progress(iterable=None, **kw) -> tqdm:
    force = os.environ.get("TANDEM_PROGRESS")
    kw.setdefault("disable", None if force is None else force == "0")
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kw)


def note(text: str) -> None:
    """A line on stderr that leaves the bars below it intact."""
    tqdm.write(text, file=sys.stderr)


@contextmanager
def stdout_to_stderr():
    """Sends everything written to stdout (fd 1: Ray's processes print there, even with
    log_to_driver off) to stderr while the run goes on, so that stdout carries the --json
    result alone; the caller prints it after the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
