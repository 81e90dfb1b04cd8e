"""What `omni-ray config [CONFIG] [key=value ...] [--keys PREFIX]` prints: every key of a resolved config.

For each key (dotted, as an override names it): its current value, type, rule, default and help text, read off the
dataclass fields and their metadata in :mod:`omni_ray.config`, so the listing cannot drift from what the loader
validates. A list of sections (``scoring.scorers``) is shown as a header line, then every item's keys as
``scoring.scorers[i].<key>`` with the item schema's defaults.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from typing import Any

from omni_ray.config import ConfigError, OmniRayConfig, choices_of

__all__ = ["KeyInfo", "config_keys", "describe"]

#: Rule metadata (omni_ray/config.py) -> how it reads.
_BOUNDS = {"gt": "> {}", "ge": ">= {}", "lt": "< {}", "le": "<= {}"}


@dataclass(frozen=True)
class KeyInfo:
    """One key of a resolved config: ``value`` and ``default`` as shown (YAML-like text), ``rule`` empty when the
    key has none, ``help`` empty when the field has no help text."""

    key: str
    value: str
    type: str
    rule: str
    default: str
    help: str


def _show(value: Any) -> str:
    """A value the way a YAML file or an override would write it (strings quoted, so an empty one is visible)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _rule(meta: Any) -> str:
    """``> 0``, ``in [0, 1]``, ``in (0, 1]``, ``one of a, b, c`` or empty, from a field's rule metadata."""
    parts = []
    low = next((k for k in ("gt", "ge") if k in meta), None)
    high = next((k for k in ("lt", "le") if k in meta), None)
    if low and high:
        parts.append(f"in {'(' if low == 'gt' else '['}{meta[low]}, {meta[high]}{')' if high == 'lt' else ']'}")
    elif low or high:
        name = low or high
        parts.append(_BOUNDS[name].format(meta[name]))
    if "choices" in meta:
        parts.append("one of " + ", ".join(map(str, choices_of(meta))))
    return ", ".join(parts)


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]


def _is_section_list(default: Any) -> bool:
    return isinstance(default, list) and bool(default) and is_dataclass(default[0])


def _walk(node: Any, prefix: str) -> list[KeyInfo]:
    out: list[KeyInfo] = []
    for f in fields(node):
        key, value, default = f"{prefix}{f.name}", getattr(node, f.name), _default(f)
        help_text = str(f.metadata.get("help", ""))
        if is_dataclass(default):
            out += _walk(value, key + ".")
        elif _is_section_list(default):
            count = f"[{len(value)} item{'' if len(value) == 1 else 's'}]"
            help_text = help_text or f"a list of sections; each item's keys follow as {key}[i].<key>"
            shown_default = f"[{len(default)} item{'' if len(default) == 1 else 's'}]"
            out.append(KeyInfo(key, count, str(f.type), "", shown_default, help_text))
            for i, item in enumerate(value):
                out += _walk(item, f"{key}[{i}].")
        else:
            out.append(KeyInfo(key, _show(value), str(f.type), _rule(f.metadata), _show(default), help_text))
    return out


def config_keys(cfg: OmniRayConfig) -> list[KeyInfo]:
    """Every key of ``cfg`` in schema order, list sections expanded item by item."""
    return _walk(cfg, "")


def describe(cfg: OmniRayConfig, prefix: str = "") -> str:
    """The keys of ``cfg`` that start with ``prefix`` (all when empty), two lines each::

        loss.beta = 2.0  [float; > 0; default 2.0]
            <help text>

    An unknown prefix raises :class:`ConfigError` naming it and the keys it may have meant.
    """
    keys = config_keys(cfg)
    chosen = [k for k in keys if k.key.startswith(prefix)]
    if not chosen:
        names = sorted({k.key for k in keys} | {k.key.rsplit(".", 1)[0] for k in keys if "." in k.key})
        near = difflib.get_close_matches(prefix, names, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(near)}?" if near else f" Sections: {', '.join(f.name for f in fields(cfg))}."
        raise ConfigError(f"no config key starts with {prefix!r}.{hint}")
    lines = []
    for k in chosen:
        facts = "; ".join(x for x in (k.type, k.rule, f"default {k.default}") if x)
        lines.append(f"{k.key} = {k.value}  [{facts}]")
        if k.help:
            lines.append(f"    {k.help}")
    return "\n".join(lines)
