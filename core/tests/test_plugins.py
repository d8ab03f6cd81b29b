"""Plugin loading: registries, owners, duplicates, broken plugins, environment switches."""

from types import SimpleNamespace

import pytest

from qcore import Allocator, Method, Quantizer, hookimpl
from qcore._errors import QcoreError
from qcore.testing import make_host


class OtherUniform(Quantizer):
    name = "uniform"


def plugin(**hooks):
    return SimpleNamespace(**{k: hookimpl(v) for k, v in hooks.items()})


def test_builtins_listed_with_components():
    host = make_host(tiny=False)
    uni = host.plugins["uniform"].to_json()
    assert uni["provides"]["quantizers"] == ["uniform"]
    assert set(uni["provides"]["calibrators"]) == {"minmax", "percentile", "mse"}
    assert uni["provides"]["allocators"] == ["fixed"] and uni["provides"]["methods"] == ["uniform"]
    assert host.default_method("uniform").name == "uniform"


def test_duplicate_name_is_an_error_naming_both_owners():
    host = make_host(("dup", plugin(qcore_register_quantizers=lambda register: register(OtherUniform))))
    with pytest.raises(QcoreError, match="registered by both 'uniform' and 'dup'"):
        host.get("quantizer", "uniform")


def test_plugin_raising_in_register_is_broken_not_fatal():
    def boom(register):
        raise RuntimeError("kaput")

    host = make_host(("bad", plugin(qcore_register_allocators=boom)), allow_broken=True)
    assert "kaput" in host.plugins["bad"].error
    assert host.get("method", "uniform")  # everything else still works
    with pytest.raises(QcoreError, match="plugin 'bad' is broken: .*kaput"):
        host.default_method("bad")


def test_unknown_hook_marks_plugin_broken():
    host = make_host(("typo", plugin(qcore_register_quantisers=lambda register: None)), allow_broken=True)
    assert "unknown hook" in host.plugins["typo"].error


def test_wrong_registration_type_is_reported():
    host = make_host(("wrong", plugin(qcore_register_allocators=lambda register: register(object))), allow_broken=True)
    assert "subclass of Allocator" in host.plugins["wrong"].error


def test_unknown_names_suggest_close_matches():
    host = make_host()
    with pytest.raises(QcoreError, match="did you mean 'uniform'"):
        host.plugin("unifrom")
    with pytest.raises(QcoreError, match="unknown calibrator 'mse2'.*available: minmax, mse, percentile"):
        host.get("calibrator", "mse2")


def test_disable_builtin_plugin(monkeypatch):
    monkeypatch.setenv("QCORE_DISABLE_PLUGINS", "uniform")
    host = make_host(tiny=False)
    assert "uniform" not in host.plugins and "core" in host.plugins


def test_third_party_method_with_default():
    class Halve(Allocator):
        name = "halve"

    def methods(register):
        register(Method("mine", quantizer="uniform", calibrator="mse", allocator="halve", default=True))

    host = make_host(("mine", plugin(qcore_register_allocators=lambda register: register(Halve),
                                     qcore_register_methods=methods)))
    assert host.default_method("mine").allocator == "halve"
    assert host.owner_of("allocator", "halve") == "mine"


def test_broken_plugin_does_not_block_a_healthy_one_with_the_same_name():
    class Dup(Quantizer):
        name = "dupq"

    def breaks_after_registering(register):
        register(Dup)
        raise RuntimeError("half-way")

    host = make_host(("bad", plugin(qcore_register_quantizers=breaks_after_registering)),
                     ("good", plugin(qcore_register_quantizers=lambda register: register(Dup))), allow_broken=True)
    assert host.get("quantizer", "dupq") is Dup and host.owner_of("quantizer", "dupq") == "good"
    assert host.plugins["bad"].provides["quantizer"] == []


def test_entry_point_named_like_a_builtin_is_reported(monkeypatch, caplog):
    from importlib import metadata

    import qcore._plugins as plugins

    fake = metadata.EntryPoint(name="uniform", value="somebody_elses_uniform", group="qcore")
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: [fake])
    with caplog.at_level("WARNING", logger="qcore._plugins"):
        host = plugins.load_host()
    assert "entry point 'uniform'" in caplog.text and "rename the entry point" in caplog.text
    assert host.get("method", "uniform").name == "uniform"  # the built-in still serves the name
