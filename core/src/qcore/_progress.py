"""Progress bars for long loops (tqdm on stderr). ``QCORE_PROGRESS=0`` turns them off; they are off by
default when stderr is not a terminal, so logs and CI output stay clean."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    flag = os.environ.get("QCORE_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no", "")
    return sys.stderr.isatty()


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
