"""MkDocs hooks: build the guide, the API reference and the tutorial list from the repository.

Nothing here is copied by hand, so the site cannot drift from its sources:

- **Guide**: ``README.md`` is split at its ``##`` headings. The text before the first one is the
  home page; each section becomes ``guide/<slug>.md`` (its ``###`` headings moved up one level).
  Links to ``notebooks/NN_name.ipynb`` point at the rendered tutorial, and ``#anchor`` links
  at the page that now holds the heading; any other relative link is kept, so ``--strict``
  fails on one that leads nowhere.
- **API reference**: one page per subpackage of ``lightstream`` (``api/<name>.md``): the
  package's docstring, then every public module's (``::: lightstream.core.engine``, ...),
  rendered by mkdocstrings from the docstrings. A module added later appears by itself.
- **Tutorials**: the executed notebooks that ``scripts/docs.py`` copied to ``docs/tutorials/``
  (gitignored), in file-name order, titled by their first heading; mkdocs-jupyter renders them.
"""

from __future__ import annotations

import ast
import json
import logging
import posixpath
import re
import unicodedata
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

logger = logging.getLogger("mkdocs.hooks.lightstream")

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PACKAGE = REPO / "lightstream"
TUTORIALS = "tutorials"
_FENCE = re.compile(r"^\s*(```|~~~)")
_NOTEBOOK_LINK = re.compile(r"\]\((?:\.?/)?notebooks/(?P<name>[^)#\s]+)\.ipynb(?P<anchor>#[^)\s]*)?\)")


def slugify(title: str) -> str:
    """The file name of a guide section: ``Train on your slides`` -> ``train-on-your-slides``."""
    text = re.sub(r"`|\*", "", title).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "section"


def split_readme(text: str) -> tuple[str, list[tuple[str, str, str]]]:
    """README text -> (home page, [(title, slug, page text)]), split at ``##`` outside code fences."""
    home: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            sections.append((line[3:].strip(), []))
            continue
        if sections:
            if not fenced and re.match(r"^#{3,6} ", line):
                line = line[1:]
            sections[-1][1].append(line)
        else:
            home.append(line)
    pages = []
    seen: set[str] = set()
    for title, lines in sections:
        slug = slugify(title)
        while slug in seen:
            slug += "-2"
        seen.add(slug)
        pages.append((title, slug, f"# {title}\n" + "\n".join(lines).rstrip() + "\n"))
    return "\n".join(home).rstrip() + "\n", pages


def _relink(text: str, depth: int) -> str:
    """Point README links to ``notebooks/*.ipynb`` at the rendered tutorials."""
    up = "../" * depth
    return _NOTEBOOK_LINK.sub(lambda m: f"]({up}{TUTORIALS}/{m['name']}.ipynb{m['anchor'] or ''})", text)


def heading_anchor(title: str) -> str:
    """The anchor Python-Markdown's ``toc`` gives a heading (its default ``slugify``)."""
    text = unicodedata.normalize("NFKD", re.sub(r"[`*]", "", title)).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(text: str) -> set[str]:
    anchors, fenced = set(), False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)):
            anchors.add(heading_anchor(heading[1]))
    return anchors


def relink_anchors(pages: dict[str, str]) -> dict[str, str]:
    """Rewrite ``](#anchor)`` links whose heading went to another page (README sections are split).

    ``pages`` maps a page's path (``index.md``, ``guide/x.md``) to its Markdown. An anchor found on
    no page is left alone, so ``--strict`` names it.
    """
    anchors = {path: _anchors(text) for path, text in pages.items()}

    def target(path: str, anchor: str) -> str:
        if anchor in anchors[path]:
            return f"#{anchor}"
        for other, found in anchors.items():
            if anchor in found:
                return posixpath.relpath(other, posixpath.dirname(path) or ".") + f"#{anchor}"
        return f"#{anchor}"

    return {path: re.sub(r"\]\(#([^)\s]+)\)", lambda m, p=path: f"]({target(p, m[1])})", text)
            for path, text in pages.items()}


def api_pages() -> list[tuple[str, str, str]]:
    """[(title, path, markdown)] of the API reference: the package, then each subpackage."""
    pages = [("lightstream", "api/index.md", _top_page())]
    for sub in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").exists() and not p.name.startswith("_")):
        pages.append((sub.name, f"api/{sub.name}.md", _api_page(f"lightstream.{sub.name}", _modules(sub))))
    return pages


def _modules(folder: Path) -> list[Path]:
    """The package's modules; a private one (``_axes.py``) only shows if the package re-exports from it."""
    return sorted(p for p in folder.glob("*.py") if not p.name.startswith("__"))


def _init(package: str) -> Path:
    return PACKAGE.parent.joinpath(*package.split("."), "__init__.py")


def exports(package: str) -> dict[str, str]:
    """Names a package's ``__init__`` imports -> the dotted path where each is defined.

    Imports from a subpackage are followed to its own ``__init__``'s source; lazy names listed in
    a ``_LAZY = {"Name": "lightstream.x"}`` dict (imported on first use) are included.
    """
    tree = ast.parse(_init(package).read_text(encoding="utf-8"))
    found: dict[str, str] = {}

    def add(name: str, module: str, attribute: str) -> None:
        defined = exports(module).get(attribute) if _init(module).exists() else None
        found[name] = defined or f"{module}.{attribute}"

    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            if node.level:
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("lightstream"):
                continue
            for alias in node.names:
                add(alias.asname or alias.name, base, alias.name)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            for name, module in ast.literal_eval(node.value).items():
                add(name, module, name)
    return found


def _public_names(package: str) -> list[str]:
    """The package's ``__all__`` (its imported names if it has none), without private ones."""
    tree = ast.parse(_init(package).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [n for n in ast.literal_eval(node.value) if not n.startswith("_")]
    return [n for n in exports(package) if not n.startswith("_")]


def _name_list(package: str) -> list[str]:
    """Links to the objects a package exports, where they are documented (checked by ``--strict``)."""
    defined = exports(package)
    links = [f"[`{name}`][{defined[name]}]" for name in _public_names(package) if name in defined]
    return [f"`{package}` exports: " + " · ".join(links), ""] if links else []


def _top_page() -> str:
    return "\n".join(["# `lightstream`", "", "::: lightstream", "    options:", "      members: false",
                      "      show_root_heading: false", "", *_name_list("lightstream")])


def _api_page(package: str, modules: list[Path]) -> str:
    """The package's docstring and exports, its public modules (in the order ``__init__`` imports them), then the rest."""
    order: dict[str, int] = {}
    for target in exports(package).values():
        if target.startswith(package + "."):
            order.setdefault(target[len(package) + 1:].split(".")[0], len(order))
    public = sorted((m for m in modules if m.stem in order), key=lambda m: order[m.stem])
    internal = [m for m in modules if m.stem not in order and not m.stem.startswith("_")]
    lines = [f"# `{package}`", "", f"::: {package}", "    options:", "      members: false",
             "      show_root_heading: false", "", *_name_list(package)]
    for module in public:
        lines += [f"::: {package}.{module.stem}", "    options:", "      heading_level: 2", ""]
    if internal:
        lines += ["## Internal modules", "",
                  "Used by the modules above; documented for contributors, not re-exported.", ""]
        for module in internal:
            lines += [f"::: {package}.{module.stem}", "    options:", "      heading_level: 3", ""]
    return "\n".join(lines)


def _contents(sections: list[tuple[str, str, str]], tutorials: list[tuple[str, str]]) -> str:
    """The home page's table of contents, as links that ``--strict`` checks."""
    lines = ["", "## Contents", "", "**Guide** (the README, one page per section): "
             + " · ".join(f"[{title}](guide/{slug}.md)" for title, slug, _ in sections), ""]
    if tutorials:
        lines += ["**Tutorials** (executed notebooks with their figures):", ""]
        lines += [f"- [{title}]({path})" for title, path in tutorials]
        lines.append("")
    lines += ["**API reference** (from the docstrings): "
              + " · ".join(f"[`{title}`]({path})" for title, path, _ in api_pages()), ""]
    return "\n".join(lines)


def tutorial_notebooks(docs_dir: Path) -> list[tuple[str, str]]:
    """[(title, path)] of the notebooks in ``docs/tutorials/``, titled by their first Markdown heading."""
    found = []
    for path in sorted((docs_dir / TUTORIALS).glob("*.ipynb")):
        title = path.stem
        try:
            cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        except (OSError, ValueError):
            cells = []
        for cell in cells:
            if cell.get("cell_type") == "markdown":
                source = "".join(cell.get("source", []))
                heading = re.search(r"^#\s+(.+)$", source, re.MULTILINE)
                if heading:
                    title = heading[1].strip()
                break
        found.append((title, f"{TUTORIALS}/{path.name}"))
    return found


def on_config(config: MkDocsConfig, **kwargs: Any) -> MkDocsConfig:
    """Set the navigation from the README's sections, the package's modules and the tutorials."""
    _, sections = split_readme(README.read_text(encoding="utf-8"))
    docs_dir = Path(config.docs_dir)
    nav: list[Any] = [{"Home": "index.md"}]
    nav.append({"Guide": [{title: f"guide/{slug}.md"} for title, slug, _ in sections]})
    tutorials = tutorial_notebooks(docs_dir)
    if tutorials:
        nav.append({"Tutorials": [{title: path} for title, path in tutorials]})
    else:
        logger.info("no executed notebooks in %s; run scripts/docs.sh build", docs_dir / TUTORIALS)
    nav.append({"API reference": [{title: path} for title, path, _ in api_pages()]})
    config.nav = nav
    return config


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    """Add the generated Markdown pages (home, guide sections, API reference)."""
    home, sections = split_readme(README.read_text(encoding="utf-8"))
    contents = _contents(sections, tutorial_notebooks(Path(config.docs_dir)))
    guide = {"index.md": _relink(home, 0)}
    for _, slug, text in sections:
        guide[f"guide/{slug}.md"] = _relink(text, 1)
    generated = relink_anchors(guide)
    generated["index.md"] += contents
    for _, path, text in api_pages():
        generated[path] = text
    for path, text in generated.items():
        existing = files.get_file_from_path(path)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, path, content=text))
    return files
