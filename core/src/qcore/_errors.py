"""Errors qcore reports to users. The CLI prints ``qcore: error: <message>`` and exits with status 2."""

from __future__ import annotations


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
