"""Progress: bars for long loops (tqdm on stderr) and one line per pipeline stage.

``QCORE_PROGRESS`` chooses: ``1`` bars, ``lines`` one line per finished stage with its time (``qcore: stage
allocate done in 24.0 s``), ``0`` nothing. Unset: bars on a terminal, lines otherwise (a log file or CI then
shows how far a long run got instead of nothing until the end).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


#: the logger of the per-stage lines (the CLI shows it as ``qcore: ...`` when stage lines are on)
stage_log = logging.getLogger("qcore.progress")


def progress_enabled() -> bool:
    """True when progress bars are shown (``QCORE_PROGRESS``, default: stderr is a terminal)."""
    flag = os.environ.get("QCORE_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no", "", "lines")
    return sys.stderr.isatty()


def stage_lines_enabled() -> bool:
    """True when each finished stage gets a line on stderr (``QCORE_PROGRESS=lines``, or unset off a terminal)."""
    flag = os.environ.get("QCORE_PROGRESS")
    return flag == "lines" if flag is not None else not sys.stderr.isatty()


def show_stage_lines() -> None:
    """Print :data:`stage_log`'s lines on stderr as ``qcore: ...`` (the CLI calls this when they are on)."""
    if any(getattr(h, "_qcore_stage_lines", False) for h in stage_log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("qcore: %(message)s"))
    handler._qcore_stage_lines = True  # type: ignore[attr-defined]
    stage_log.addHandler(handler)
    stage_log.setLevel(logging.INFO)
    stage_log.propagate = False


def track(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
          postfix: Callable[[], str] | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar when enabled.

    :param postfix: called after each item is processed (only while a bar is shown); its text follows the bar,
        e.g. the running loss of an optimisation loop.

    .. versionadded:: 0.1
       ``postfix``.
    """
    if not progress_enabled():
        yield from items
        return
    from tqdm.auto import tqdm

    bar = tqdm(items, desc=desc, unit=unit, total=total, leave=False, file=sys.stderr)
    for item in bar:
        yield item
        if postfix is not None:
            bar.set_postfix_str(postfix(), refresh=False)
