"""pytest fixtures installed with qcore (entry point ``pytest11``): ``qcore_host`` (built-ins plus the tiny
task, no installed plugins) and ``tiny_convnet``."""

from __future__ import annotations

import pytest
from torch import nn

from qcore._plugins import Host


@pytest.fixture
def qcore_host() -> Host:
    from qcore.testing.tiny import make_host

    return make_host()


@pytest.fixture
def tiny_convnet() -> nn.Module:
    from qcore.testing.tiny import tiny_convnet as build

    return build()
