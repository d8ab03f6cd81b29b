"""Errors qcore reports to users. The CLI prints ``qcore: error: <message>`` and exits with status 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class QcoreError(Exception):
    """A problem with the user's input or environment, stated with the fix. Never a bug in qcore."""


class MissingDependencyError(QcoreError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, install: str, purpose: str = "") -> None:
        why = f" (needed for {purpose})" if purpose else ""
        super().__init__(f"{package} is not installed{why}; install it with `{install}`")
        self.package = package
        self.install = install


class NotImplementedMethodError(QcoreError):
    """A method or option that is named but not implemented yet: raised instead of returning numbers."""


class ComponentError(QcoreError):
    """An unexpected exception inside a plugin's component (a bug there, not the user's input), named with the
    component and the plugin that registered it. The original exception is its ``__cause__``."""


class ContractError(QcoreError):
    """A component broke its contract (returned the wrong type, left a layer out, went over budget, left a
    quantizer uncalibrated): named with the component and its plugin."""


#: exceptions that are about the machine, not a component's code: they pass through unchanged
_ENVIRONMENT = (OSError, MemoryError)


@contextmanager
def blame(kind: str, name: str, owner: str) -> Iterator[None]:
    """Run a component's code; an exception that is not a :class:`QcoreError` (nor the machine's: an OS error,
    memory exhausted) becomes a :class:`ComponentError` that reads ``allocator 'x' (plugin 'y'): TypeError:
    ...``, with the original as its cause."""
    try:
        yield
    except QcoreError:
        raise
    except _ENVIRONMENT:
        raise
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch's device OOM: the machine's, like MemoryError
            raise
        first = (str(exc).splitlines() or [""])[0][:300]
        raise ComponentError(f"{kind} {name!r} (plugin {owner!r}): {type(exc).__name__}: {first or '(no message)'}"
                             " (raised in this component or in code it called; the full traceback: --traceback or "
                             "QCORE_DEBUG=1 on the command line; report bugs to the plugin's authors)") from exc
