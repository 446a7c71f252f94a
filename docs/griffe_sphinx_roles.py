"""Griffe extension: turn the Sphinx roles of lightstream's docstrings into mkdocstrings cross-references.

The docstrings are Google style with Sphinx roles (``:class:`StreamingCNN```,
``:func:`~lightstream.data.slide_heatmap```), as Sphinx and IDEs read them. mkdocstrings renders
Markdown, so this extension rewrites each role once the package is loaded:

- a target that resolves inside ``lightstream`` (relative to the object, its parents, or as an
  absolute path; re-exports followed to where the object is defined) becomes
  ``[`display`][path.where.defined]``, a link autorefs checks;
- a target that resolves outside ``lightstream`` (``torch``, ``logging``) becomes plain code;
- a target that resolves nowhere is still written as a cross-reference, so that ``mkdocs build
  --strict`` fails on it and names it (a renamed class, a typo).

``~`` shows only the last component, as in Sphinx; ``:func:``/``:meth:`` get ``()``. A reST
literal-block marker (``Example::`` before an indented block) loses its second colon.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import griffe

logger = logging.getLogger(__name__)

ROLE = re.compile(r":(?:py:)?(?P<role>class|mod|func|meth|attr|data|exc|obj|const)?:`(?P<body>[^`]+)`")
"""A Sphinx role: ``:class:`~a.b.C```, ``:meth:`label <a.b.C.m>```."""

LITERAL = re.compile(r"(\S)::\n[ \t]*\n(?=[ \t]+\S)")
"""reST's ``text::`` before an indented block: Markdown shows the block as code already, so ``text:``."""

PACKAGE = "lightstream"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the package into autorefs cross-references."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.path != PACKAGE:
            return
        for obj in _walk(pkg):
            if obj.docstring is not None:
                value = ROLE.sub(lambda m, o=obj: _rewrite(m, o, pkg), obj.docstring.value)
                obj.docstring.value = LITERAL.sub(r"\1:\n\n", value)


def _walk(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _rewrite(match: re.Match[str], obj: griffe.Object, pkg: griffe.Module) -> str:
    role, body = match["role"] or "obj", match["body"].strip()
    explicit = re.fullmatch(r"(?P<label>.+?)\s*<(?P<target>[^>]+)>", body)
    target = explicit["target"].strip() if explicit else body
    short = target.startswith("~")
    target = target.lstrip("~.")
    if explicit:
        label = explicit["label"]
    else:
        label = target.rsplit(".", 1)[-1] if short else target
        if role in {"func", "meth"}:
            label += "()"
    found = _resolve(target, obj, pkg)
    if found is None and not target.startswith(PACKAGE + ".") and "." in target and not _inside(target, obj, pkg):
        return f"`{label}`"  # an outside name such as torch.nn.Module or logging.Logger
    if found == "":
        return f"`{label}`"  # resolves outside lightstream
    return f"[`{label}`][{found or target}]"


def _inside(target: str, obj: griffe.Object, pkg: griffe.Module) -> bool:
    """Whether the first component of ``target`` is a name of lightstream (so a miss is a broken reference)."""
    head = target.split(".", 1)[0]
    return head == PACKAGE or _resolve(head, obj, pkg) not in (None, "")


def _resolve(target: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
    """The defining path of ``target`` seen from ``obj``; ``""`` if it is outside lightstream; None if unknown."""
    scopes: list[str] = []
    scope: griffe.Object | None = obj
    while scope is not None:
        scopes.append(f"{scope.path}.{target}")
        scope = scope.parent
    scopes.append(target)
    for path in scopes:
        if path != PACKAGE and not path.startswith(PACKAGE + "."):
            continue
        try:
            found = pkg if path == PACKAGE else pkg[path[len(PACKAGE) + 1:]]
        except (KeyError, ValueError):
            continue
        except griffe.AliasResolutionError:
            return ""
        except griffe.CyclicAliasError:
            return ""
        try:
            final = found.final_target if found.is_alias else found
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return ""
        return final.path if final.path.startswith(PACKAGE) else ""
    return None
