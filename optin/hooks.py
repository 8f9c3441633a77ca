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


def register_checked(pm: pluggy.PluginManager, plugin: Any, name: str) -> str | None:
    """Register ``plugin`` and validate it against the hook specifications; a plugin whose hooks do not
    match (e.g. a misspelled hook name such as ``optin_task``) is unregistered. Returns why, or None."""
    pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=name)
        known = ", ".join(sorted(n for n in dir(OptinHookSpecs) if n.startswith("optin_")))
        return f"{exc} (the hooks optin knows are: {known})"
    return None


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every ``optin.hooks`` entry point registered.

    A hook plugin that fails to import, or implements a hook optin does not specify, is recorded in
    ``broken`` (shown by ``optin list``) instead of breaking every command.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(OptinHookSpecs)
    eps = sorted(entry_points(group="optin.hooks"), key=lambda ep: (ep.dist is None or ep.dist.name != "optin"))
    for ep in eps:  # built-ins first, so a third-party plugin cannot silently replace them
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            why = register_checked(pm, ep.load(), ep.name)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
        if why:
            broken[ep.name] = why
    return pm


conflicts: dict[str, str] = {}  # "hook:name" -> why a contribution was ignored (shown by `optin list`)


def collect(hook_name: str) -> dict[str, Any]:
    """Merge the dicts returned by every implementation of a dict-returning hook, each called through
    pluggy (``pm.subset_hook_caller``: that plugin alone).

    Names are first come, first served in registration order (built-ins register first, as the ``optin``
    distribution's entry points); a later plugin reusing a name is ignored and recorded in ``conflicts``.
    """
    pm = plugin_manager()
    caller = getattr(pm.hook, hook_name)
    merged: dict[str, Any] = {}
    every = pm.get_plugins()
    for impl in caller.get_hookimpls():  # registration order
        alone = pm.subset_hook_caller(hook_name, remove_plugins=[p for p in every if p is not impl.plugin])
        for result in alone():
            for name, value in (result or {}).items():
                if name in merged:
                    conflicts[f"{hook_name}:{name}"] = f"{impl.plugin_name} also defines {name!r}; ignored"
                    continue
                merged[name] = value
    return merged


def notify(event: str, **info: Any) -> None:
    plugin_manager().hook.optin_progress(event=event, info=info)
