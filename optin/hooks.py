"""pluggy hooks for the cross-cutting extension points (tasks, named models, CLI commands, progress).

One-of-a-kind choices (which scorer, which adapter) are entry-point plugins (see `optin.registry`);
hooks are for things many plugins contribute to at once, the convention pytest plugin authors know.
Register hook implementations under the entry-point group ``optin.hooks``.
"""
from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

import pluggy

PROJECT = "optin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class OptinHookSpecs:
    @hookspec
    def optin_tasks(self) -> dict[str, Any]:
        """Return ``{name: optin.tasks.Task}``: data tasks usable with ``--task NAME``."""

    @hookspec
    def optin_models(self) -> dict[str, Any]:
        """Return ``{name: optin.models.NamedModel}``: named models usable with ``--model NAME``."""

    @hookspec
    def optin_cli(self, cli: Any) -> None:
        """Add commands or groups to the ``optin`` click group."""

    @hookspec
    def optin_progress(self, event: str, info: dict) -> None:
        """Observe recipe progress: ``stage`` (info: stage, scorer) after scoring and ``done`` (info: report)."""


broken: dict[str, str] = {}  # hook plugins that failed to import: name -> reason (shown by `optin list`)


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every ``optin.hooks`` entry point registered.

    A hook plugin that fails to import is recorded in ``broken`` instead of breaking every command.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(OptinHookSpecs)
    eps = sorted(entry_points(group="optin.hooks"), key=lambda ep: (ep.dist is None or ep.dist.name != "optin"))
    for ep in eps:  # built-ins first, so a third-party plugin cannot silently replace them
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:
            broken[ep.name] = f"{type(exc).__name__}: {exc}"
    return pm


conflicts: dict[str, str] = {}  # "hook:name" -> why a contribution was ignored (shown by `optin list`)


def collect(hook_name: str) -> dict[str, Any]:
    """Merge the dicts returned by every implementation of a dict-returning hook.

    Names are first come, first served in registration order (built-ins register first, as the ``optin``
    distribution's entry points); a later plugin reusing a name is ignored and recorded in ``conflicts``.
    """
    pm = plugin_manager()
    merged: dict[str, Any] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order
        for name, value in (getattr(impl.plugin, hook_name)() or {}).items():
            if name in merged:
                conflicts[f"{hook_name}:{name}"] = f"{impl.plugin_name} also defines {name!r}; ignored"
                continue
            merged[name] = value
    return merged


def notify(event: str, **info: Any) -> None:
    plugin_manager().hook.optin_progress(event=event, info=info)
