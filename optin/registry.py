"""Finds plugins of the four kinds through Python entry points and resolves them by name."""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from .errors import OptinError, UnknownPluginError

GROUPS: dict[str, str] = {
    "adapter": "optin.adapters",
    "scorer": "optin.scorers",
    "searcher": "optin.searchers",
    "reducer": "optin.reducers",
}

_local: dict[str, dict[str, Any]] = {kind: {} for kind in GROUPS}


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    origin: str  # distribution that declares it ("<runtime>" for register())
    target: str  # "module:attr"
    error: str | None = None  # why it cannot be used here (e.g. a missing optional dependency)
    summary: str = ""

    @property
    def available(self) -> bool:
        return self.error is None


def register(kind: str, name: str, obj: Any) -> None:
    """Register a plugin in this process only (notebooks, tests). Packages should use entry points."""
    _check_kind(kind)
    _local[kind][name] = obj


def _check_kind(kind: str) -> None:
    if kind not in GROUPS:
        raise OptinError(f"unknown plugin kind {kind!r}; kinds are: {', '.join(GROUPS)}")


def _entry_points(kind: str) -> dict[str, Any]:
    eps = {}
    for ep in entry_points(group=GROUPS[kind]):
        eps.setdefault(ep.name, ep)  # first distribution wins on duplicate names
    return eps


def _unavailable_reason(obj: Any) -> str | None:
    check = getattr(obj, "unavailable_reason", None)
    return check() if callable(check) else None


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0] if doc else ""


def plugins(kind: str | None = None) -> list[PluginInfo]:
    """Every plugin of a kind (or of all kinds), loaded so that broken ones report why."""
    kinds = [kind] if kind else list(GROUPS)
    out: list[PluginInfo] = []
    for k in kinds:
        _check_kind(k)
        for name, ep in sorted(_entry_points(k).items()):
            origin = ep.dist.name if ep.dist is not None else "?"
            try:
                obj = ep.load()
                out.append(PluginInfo(k, name, origin, ep.value, _unavailable_reason(obj), _summary(obj)))
            except Exception as exc:  # a plugin whose import fails is listed, not fatal
                out.append(PluginInfo(k, name, origin, ep.value, f"failed to import: {exc}"))
        for name, obj in sorted(_local[k].items()):
            target = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', '?')}"
            out.append(PluginInfo(k, name, "<runtime>", target, _unavailable_reason(obj), _summary(obj)))
    return out


def names(kind: str) -> list[str]:
    _check_kind(kind)
    return sorted(set(_entry_points(kind)) | set(_local[kind]))


def unknown_name_message(what: str, name: str, known: list[str], hint: str = "") -> str:
    close = difflib.get_close_matches(name, known, n=1)
    msg = f"unknown {what} {name!r}; known: {', '.join(known) or '(none installed)'}"
    if close:
        msg += f" (did you mean {close[0]!r}?)"
    return msg + hint


def get(kind: str, name: str) -> Any:
    """The plugin class registered as ``name``, or a clear error listing the known ones."""
    _check_kind(kind)
    if name in _local[kind]:
        obj = _local[kind][name]
    else:
        eps = _entry_points(kind)
        if name not in eps:
            raise UnknownPluginError(
                unknown_name_message(kind, name, names(kind), "; see `optin list`")
            )
        try:
            obj = eps[name].load()
        except Exception as exc:
            raise OptinError(f"{kind} {name!r} is installed but failed to import: {exc}") from exc
    reason = _unavailable_reason(obj)
    if reason:
        raise OptinError(f"{kind} {name!r} is unavailable here: {reason}")
    return obj


def option_names(obj: Any) -> list[str]:
    """Keyword options a plugin's constructor accepts (its plugin options)."""
    sig = inspect.signature(obj)
    return [p.name for p in sig.parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]


def create(kind: str, name: str, options: dict[str, Any] | None = None) -> Any:
    """Instantiate a scorer/searcher/reducer with the options it declares; others are ignored."""
    cls = get(kind, name)
    options = options or {}
    accepted = option_names(cls)
    given = {k: v for k, v in options.items() if k in accepted}
    try:
        return cls(**given)
    except (TypeError, ValueError) as exc:  # e.g. float("abc") in a constructor: a bad option value
        shown = ", ".join(f"{k}={v!r}" for k, v in given.items()) or "no options"
        raise OptinError(f"{kind} {name!r} refused its options ({shown}): {one_line(exc)}; fix the value "
                         f"with --set KEY=VALUE (see docs/plugins.md for each option's type)") from None


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, shortened to ``limit`` characters (for ``Error:`` lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_options(options: dict[str, Any], selected: list[tuple[str, str]]) -> None:
    """Every plugin option must be accepted by at least one selected plugin (catches typos)."""
    accepted: dict[str, list[str]] = {}
    for kind, name in selected:
        for opt in option_names(get(kind, name)):
            accepted.setdefault(opt, []).append(f"{kind} {name}")
    for key in options:
        if key not in accepted:
            known = ", ".join(f"{k} ({'/'.join(v)})" for k, v in sorted(accepted.items())) or "none"
            close = difflib.get_close_matches(key, list(accepted), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise OptinError(f"unknown plugin option {key!r}{hint}; the selected plugins accept: {known}")
