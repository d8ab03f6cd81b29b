import pytest


@pytest.fixture(autouse=True)
def _private_curve_cache(tmp_path, monkeypatch):
    """Keep every test's RD curve cache in its own folder."""
    monkeypatch.setenv("QCORE_CACHE_DIR", str(tmp_path / "qcore-cache"))
