"""Plugin loading and the component registries.

Plugins come from the entry-point group ``qcore`` plus core's built-ins. Environment switches:

* ``QCORE_LOAD_PLUGINS=a,b``: load only these entry points (empty: none); built-ins always load.
* ``QCORE_DISABLE_PLUGINS=a,b``: block these plugins (entry points or built-ins such as ``uniform``).

A plugin that fails to import, implements an unknown hook or raises while registering is *broken*: it is
listed with its error by ``qcore plugins`` and is fatal only when a run selects it. A component name
registered by two plugins is an error naming both, raised when that name is used.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from qcore import hookspecs
from qcore._components import Allocator, Calibrator, Correction, Method, ModelLoader, Quantizer, Task
from qcore._errors import QcoreError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qcore"
BUILTINS: dict[str, str] = {"core": "qcore._builtin.core", "uniform": "qcore._builtin.uniform"}
#: kind -> (registry hook, required base class or value type)
KINDS: dict[str, tuple[str, type]] = {
    "quantizer": ("qcore_register_quantizers", Quantizer),
    "calibrator": ("qcore_register_calibrators", Calibrator),
    "allocator": ("qcore_register_allocators", Allocator),
    "correction": ("qcore_register_corrections", Correction),
    "method": ("qcore_register_methods", Method),
    "task": ("qcore_register_tasks", Task),
    "model_loader": ("qcore_register_model_loaders", ModelLoader),
}


@dataclass
class PluginRecord:
    """One plugin as ``qcore plugins`` lists it."""

    name: str
    version: str
    source: str  # "builtin" or "entry point <dist>"
    module: ModuleType | None = None
    error: str | None = None
    provides: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    #: names this plugin registers that another plugin registered too (unusable until one is disabled)
    clashes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "version": self.version, "source": self.source,
                             "provides": {k + "s": v for k, v in self.provides.items()}}
        problems = ([self.error] if self.error else []) + self.clashes
        if problems:
            d["error"] = "; ".join(problems)
        return d


@dataclass
class Entry:
    name: str
    obj: Any
    owner: str


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _describe(exc: BaseException) -> str:
    """``Type: message`` of an exception a plugin raised; ``sys.exit(3)`` reads as such."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r}) while loading"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _did_you_mean(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _switch_hint(name: str | None = None) -> str:
    """Why a plugin (``name``, or any for a missing component) may be absent because of the environment switches:
    "" when neither switch is set or neither explains it."""
    only = _csv(os.environ.get("QCORE_LOAD_PLUGINS"))
    blocked = _csv(os.environ.get("QCORE_DISABLE_PLUGINS")) or []
    if name is not None and name in blocked:
        return (f"; it is disabled by QCORE_DISABLE_PLUGINS={os.environ['QCORE_DISABLE_PLUGINS']}: remove {name} "
                "from it to use it")
    if only is not None and (name is None or name not in only):
        return (f"; QCORE_LOAD_PLUGINS={os.environ['QCORE_LOAD_PLUGINS']} loads only the plugins it names (and the "
                "built-ins): add the plugin to it or unset it")
    if name is None and blocked:
        return f"; QCORE_DISABLE_PLUGINS={os.environ['QCORE_DISABLE_PLUGINS']} is set: check it"
    return ""


class Host:
    """The loaded plugins, their hook relay and the registries of their components."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("qcore")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginRecord] = {}
        self.tables: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self.conflicts: dict[tuple[str, str], list[str]] = {}

    @property
    def hook(self) -> Any:
        return self.pm.hook

    # -- loading ---------------------------------------------------------------------------------------------
    def add_plugin(self, name: str, module: Any, version: str, source: str) -> None:
        """Register one plugin object; a failure marks it broken instead of raising."""
        record = PluginRecord(name=name, version=version, source=source, module=module)
        self.plugins[name] = record
        unknown = [a for a in dir(module) if a.startswith("qcore_") and callable(getattr(module, a))
                   and not hasattr(hookspecs, a)]
        if unknown:
            record.error = f"implements unknown hook(s) {', '.join(unknown)} (misspelt, or needs a newer qcore)"
            return
        try:
            self.pm.register(module, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            record.error = f"invalid hook implementation: {exc}"

    def load_entry_points(self) -> None:
        only = _csv(os.environ.get("QCORE_LOAD_PLUGINS"))
        blocked = set(_csv(os.environ.get("QCORE_DISABLE_PLUGINS")) or [])
        points = metadata.entry_points(group=ENTRY_POINT_GROUP)
        known = {ep.name for ep in points} | set(BUILTINS)
        for var, names in (("QCORE_LOAD_PLUGINS", only or []), ("QCORE_DISABLE_PLUGINS", blocked)):
            for name in sorted(set(names) - known):
                log.warning("%s names %r, which is no installed plugin%s; installed: %s", var, name,
                            _did_you_mean(name, known), ", ".join(sorted(known)))
        for ep in points:
            if ep.name in blocked or (only is not None and ep.name not in only):
                continue
            dist = getattr(ep, "dist", None)
            if ep.name in self.plugins:  # a built-in or an earlier entry point already has this name
                if ep.value != getattr(self.plugins[ep.name].module, "__name__", None):
                    log.warning("entry point %r of %s is ignored: plugin %r is already loaded from %s; rename the "
                                "entry point", ep.name, dist.metadata["Name"] if dist is not None else "?", ep.name,
                                self.plugins[ep.name].source)
                continue
            version = dist.version if dist is not None else "?"
            source = f"entry point of {dist.metadata['Name'] if dist is not None else '?'}"
            try:
                module = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - a broken third-party plugin must not take qcore down,
                # not even by calling sys.exit() (SystemExit) while it is imported
                log.warning("plugin %r failed to load: %s", ep.name, _describe(exc))
                self.plugins[ep.name] = PluginRecord(ep.name, version, source, error=_describe(exc))
                continue
            self.add_plugin(ep.name, module, version, source)

    def load_builtins(self) -> None:
        from qcore import __version__

        blocked = set(_csv(os.environ.get("QCORE_DISABLE_PLUGINS")) or []) - {"core"}
        for name, modname in BUILTINS.items():
            if name not in blocked:
                self.add_plugin(name, importlib.import_module(modname), __version__, "builtin")

    # -- registries ------------------------------------------------------------------------------------------
    def build_registries(self) -> None:
        """Collect every plugin's registrations, then fill the tables from the plugins that did not break, so a
        broken plugin can neither register half its components nor block a healthy plugin's names."""
        collected: dict[str, list[tuple[str, str, Any]]] = {}
        for kind, (hookname, base) in KINDS.items():
            for impl in getattr(self.pm.hook, hookname).get_hookimpls():
                owner = impl.plugin_name
                record = self.plugins[owner]
                if record.error:
                    continue
                items = collected.setdefault(owner, [])
                try:
                    impl.function(register=self._register_fn(kind, base, items))
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001 - sys.exit() in a hook breaks that plugin only
                    record.error = f"{hookname} raised {_describe(exc)}"
                    log.warning("plugin %r is broken: %s", owner, record.error)
        for owner, items in collected.items():
            if self.plugins[owner].error:
                continue
            for kind, name, obj in items:
                table = self.tables[kind]
                if name in table and table[name].owner != owner:
                    first = table[name].owner
                    self.conflicts.setdefault((kind, name), [first]).append(owner)
                    for a, b in ((owner, first), (first, owner)):
                        self.plugins[a].clashes.append(f"{kind} {name!r} is also registered by {b!r}; disable one "
                                                       f"with QCORE_DISABLE_PLUGINS")
                    continue
                table[name] = Entry(name, obj, owner)
                self.plugins[owner].provides[kind].append(name)

    @staticmethod
    def _register_fn(kind: str, base: type, items: list[tuple[str, str, Any]]) -> Any:
        def register(obj: Any, **_: Any) -> None:
            value = base in (Method, ModelLoader)
            ok = isinstance(obj, base) if value else isinstance(obj, type) and issubclass(obj, base)
            if not ok:
                raise TypeError(f"{kind} registrations must be {'a' if value else 'a subclass of'} {base.__name__}, "
                                f"got {obj!r}")
            name = obj.name  # model loaders: "task/prefix" (each task has its own prefixes)
            if not name:
                raise TypeError(f"{kind} {obj!r} has no name")
            items.append((kind, name, obj))
        return register

    # -- lookup ----------------------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        """The component ``name`` of ``kind``, or a :class:`QcoreError` that says what exists."""
        owners = self.conflicts.get((kind, name))
        if owners:
            raise QcoreError(f"{kind} {name!r} is registered by both {owners[0]!r} and {owners[1]!r}; uninstall "
                             f"one or disable it with QCORE_DISABLE_PLUGINS={owners[1]}")
        table = self.tables[kind]
        if name not in table:
            broken = [p.name for p in self.plugins.values() if p.error]
            hint = f"; broken plugins that may provide it: {', '.join(broken)} (see `qcore plugins`)" if broken else ""
            if kind == "task" and not broken:
                hint = ("; tasks are plugins: from a qcore checkout, pip install -e ./classification or "
                        "-e ./detection (see README)")
            hint = _switch_hint() + hint  # a switch that hides plugins may explain a missing component first
            raise QcoreError(f"unknown {kind.replace('_', ' ')} {name!r}{_did_you_mean(name, table)}; available: "
                             f"{', '.join(sorted(table)) or '(none)'}{hint}")
        return table[name].obj

    def model_loader(self, task: str, prefix: str) -> ModelLoader:
        """The loader serving ``--model PREFIX:NAME`` for ``task``, or an error naming the task it belongs to or
        the prefixes this task has."""
        table = self.tables["model_loader"]
        key = f"{task}/{prefix}"
        if key in table or ("model_loader", key) in self.conflicts:
            return self.get("model_loader", key)
        others = sorted({e.obj.task for e in table.values() if e.obj.prefix == prefix})
        if others:
            raise QcoreError(f"model prefix {prefix!r} belongs to task {others[0]!r}; use --task {others[0]}")
        mine = sorted(e.obj.prefix for e in table.values() if e.obj.task == task)
        raise QcoreError(f"unknown model prefix {prefix!r} for task {task!r}{_did_you_mean(prefix, mine)}; "
                         f"available: {', '.join(p + ':' for p in mine) or '(none)'}")

    def owner_of(self, kind: str, name: str) -> str:
        return self.tables[kind][name].owner

    def plugin(self, name: str) -> PluginRecord:
        """A loaded, working plugin by name, or a :class:`QcoreError` saying why it cannot be used."""
        record = self.plugins.get(name)
        if record is None and _switch_hint(name):
            raise QcoreError(f"plugin {name!r} is not loaded{_switch_hint(name)}")
        if record is None:
            raise QcoreError(f"unknown plugin {name!r}{_did_you_mean(name, self.plugins)}; installed: "
                             f"{', '.join(sorted(self.plugins))}. Plugins are separate distributions: install it "
                             "(from a qcore checkout: pip install -e plugins/NAME, or -e ./classification / "
                             "./detection for tasks; README 'Status' lists what is implemented), or check "
                             "QCORE_LOAD_PLUGINS / QCORE_DISABLE_PLUGINS")
        if record.error:
            raise QcoreError(f"plugin {name!r} is broken: {record.error}; reinstall or fix it, or run another "
                             "plugin")
        return record

    def default_method(self, plugin: str) -> Method:
        record = self.plugin(plugin)
        methods = [self.tables["method"][m].obj for m in record.provides["method"]]
        defaults = [m for m in methods if m.default] or (methods if len(methods) == 1 else [])
        if not defaults:
            raise QcoreError(f"plugin {plugin!r} has no default method; choose one with --method "
                             f"({', '.join(m.name for m in methods) or 'it registers none'})")
        return defaults[0]


def load_host(entrypoints: bool = True, extra: Iterable[tuple[str, Any]] = ()) -> Host:
    """Build a :class:`Host`: built-ins, installed entry points (unless ``entrypoints=False``) and ``extra``
    ``(name, plugin_object)`` pairs (tests use this), then the registries."""
    host = Host()
    host.load_builtins()
    if entrypoints:
        host.load_entry_points()
    for name, obj in extra:
        host.add_plugin(name, obj, "local", "local")
    host.build_registries()
    return host
