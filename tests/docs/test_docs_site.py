"""The documentation site: strict mode fails on broken references, and tutorials keep their figures.

The builds here are small throwaway MkDocs projects that use the real ``mkdocs.yml``'s theme,
Markdown extensions and plugins (mkdocstrings with ``docs/griffe_sphinx_roles.py``, mkdocs-jupyter)
on a two-class stand-in package and a notebook made in the test, so they take seconds; the real
site is built by ``scripts/docs.sh build`` in CI (``.ci/run``).
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")
pytest.importorskip("mkdocs_jupyter")

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


docs_script = _load("lightstream_docs_script", REPO / "scripts" / "docs.py")
hooks = _load("lightstream_docs_hooks", REPO / "docs" / "hooks.py")


def _png(width: int = 40, height: int = 30) -> bytes:
    """A real PNG (a grey gradient), so the page's image data is what a figure output carries."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    rows = b"".join(b"\x00" + bytes((x * 6) % 256 for x in range(width)) for _ in range(height))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _notebook(figures: int) -> dict:
    png = base64.b64encode(_png()).decode()
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# A tiny tutorial\n"]}]
    for i in range(figures):
        cells.append({"cell_type": "code", "execution_count": i + 1, "metadata": {}, "source": [f"plot({i})"],
                      "outputs": [{"output_type": "display_data", "metadata": {},
                                   "data": {"image/png": png, "text/plain": ["<Figure>"]}}]})
    cells.append({"cell_type": "code", "execution_count": figures + 1, "metadata": {}, "source": ["tuner"],
                  "outputs": [{"output_type": "display_data", "metadata": {},
                               "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "m1", "version_major": 2,
                                                                                    "version_minor": 0},
                                        "image/png": png, "text/plain": ["Tuner()"]}}]})
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def _project(tmp_path: Path, docstring: str, page: str, notebooks: dict[str, dict | Path]) -> Path:
    """A throwaway MkDocs project with the real config's theme, extensions and plugins."""
    real = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    src = tmp_path / "src" / "lightstream"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text('"""Stand-in package."""\n')
    (src / "shapes.py").write_text(textwrap.dedent(f'''\
        """Shapes: {docstring}"""

        import pathlib


        class Square:
            """A square; see :class:`Circle` and :meth:`Circle.area`."""


        class Circle:
            """A circle."""

            def area(self) -> float:
                """Its area."""
                return 0.0
        '''))
    docs = tmp_path / "docs"
    (docs / "tutorials").mkdir(parents=True)
    (docs / "index.md").write_text(page)
    (docs / "api.md").write_text("# API\n\n::: lightstream.shapes\n")
    nav = [{"Home": "index.md"}, {"API": "api.md"}]
    for name, notebook in notebooks.items():
        target = docs / "tutorials" / f"{name}.ipynb"
        if isinstance(notebook, Path):
            target.write_bytes(notebook.read_bytes())
        else:
            target.write_text(json.dumps(notebook))
        nav.append({name: f"tutorials/{name}.ipynb"})
    config = {k: copy.deepcopy(v) for k, v in real.items() if k not in {"hooks", "exclude_docs", "watch"}}
    config.update(docs_dir=str(docs), site_dir=str(tmp_path / "site"), nav=nav)
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            python = plugin["mkdocstrings"]["handlers"]["python"]
            python["paths"] = [str(tmp_path / "src")]
            python["options"]["extensions"] = [str(REPO / ext) for ext in python["options"]["extensions"]]
    path = tmp_path / "mkdocs.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _build(config: Path, capfd: pytest.CaptureFixture[str]) -> tuple[bool, str]:
    """Build as ``scripts/docs.sh build`` does (``build_site``): (succeeded, everything mkdocs printed)."""
    try:
        docs_script.build_site(config, config.parent / "site")
        ok = True
    except docs_script.DocsError:
        ok = False
    out, err = capfd.readouterr()
    return ok, out + err


def test_the_real_config_is_strict_and_ci_builds_it() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config["strict"] is True
    assert all(config["validation"][key] == "warn" for key in ("unrecognized_links", "anchors", "omitted_files"))
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/docs.sh build" in ci and ci.index("pytest") < ci.index("scripts/docs.sh build")


@pytest.mark.slow
def test_strict_build_fails_on_a_broken_docstring_reference_and_a_broken_link(tmp_path: Path, capfd) -> None:
    config = _project(tmp_path, "drawn by :func:`draw_hexagon` (renamed).",
                      "# Home\n\nSee [the missing page](missing.md) and [a section](#no-such-section).\n",
                      {"01_tiny": _notebook(1)})
    ok, log = _build(config, capfd)
    assert not ok, log
    assert "Aborted with" in log and "strict mode" in log
    assert "draw_hexagon" in log           # the docstring's role that resolves nowhere
    assert "missing.md" in log             # the Markdown link to no page
    assert "no-such-section" in log        # the anchor to no heading


@pytest.mark.slow
def test_good_project_builds_with_role_links_and_tutorial_figures(tmp_path: Path, capfd) -> None:
    config = _project(tmp_path, "see :class:`~lightstream.shapes.Square`, :class:`round ones <Circle>` and "
                      ":class:`pathlib.Path`.", "# Home\n\n[API](api.md)\n",
                      {"01_tiny": _notebook(2)})
    ok, log = _build(config, capfd)
    assert ok, log
    site = tmp_path / "site"
    api = (site / "api" / "index.html").read_text()
    # roles became links to the objects' anchors, displayed as Sphinx would (~ shortens, () for methods)
    assert 'href="#lightstream.shapes.Square"><code>Square</code>' in api
    assert 'href="#lightstream.shapes.Circle.area"><code>Circle.area()</code>' in api
    assert 'href="#lightstream.shapes.Circle"><code>round ones</code>' in api    # :role:`label <target>`
    assert "<code>pathlib.Path</code>" in api and 'href="#pathlib' not in api  # outside names stay plain code
    assert ":class:" not in api and ":meth:" not in api
    notebooks = sorted((tmp_path / "docs" / "tutorials").glob("*.ipynb"))
    assert docs_script.png_outputs(notebooks[0]) == 2  # the two figures; not the widget view's PNG fallback
    assert docs_script.check_tutorial_figures(notebooks, site) == []
    # a page whose figures were lost is reported
    page = site / "tutorials" / "01_tiny" / "index.html"
    page.write_text(docs_script._PNG_IMG.sub("<img src=\"lost.png", page.read_text()))
    assert docs_script.check_tutorial_figures(notebooks, site) == [f"{page}: shows 0 PNG figures, the notebook has 2"]


def _fresh_executed_notebooks() -> list[Path]:
    fresh = []
    for tutorial in docs_script.tutorials():
        if tutorial.stale_reason() is None:
            fresh.append(tutorial.executed)
    return fresh


@pytest.mark.slow
@pytest.mark.skipif(not _fresh_executed_notebooks(),
                    reason="no executed notebooks in output/notebooks (the notebook test or run_notebooks.py --small makes them)")
def test_executed_tutorials_render_with_all_their_figures(tmp_path: Path, capfd) -> None:
    executed = _fresh_executed_notebooks()
    config = _project(tmp_path, "plain.", "# Home\n", {p.stem: p for p in executed})
    ok, log = _build(config, capfd)
    assert ok, log
    copies = sorted((tmp_path / "docs" / "tutorials").glob("*.ipynb"))
    assert all(docs_script.png_outputs(p) >= 1 for p in copies), "every tutorial shows at least one figure"
    assert docs_script.check_tutorial_figures(copies, tmp_path / "site") == []


def test_stale_executed_copies_are_detected(tmp_path: Path) -> None:
    source, executed = tmp_path / "01_a.ipynb", tmp_path / "out" / "01_a.ipynb"
    source.write_text(json.dumps(_notebook(0)))
    tutorial = docs_script.Tutorial(source, executed, tmp_path / "docs" / "01_a.ipynb")
    assert tutorial.stale_reason() == "not executed yet"
    executed.parent.mkdir()
    nb = _notebook(1)
    nb["metadata"]["lightstream"] = {"executed": {"ok": False}}
    executed.write_text(json.dumps(nb))
    assert tutorial.stale_reason() == "its last run failed"
    nb["metadata"]["lightstream"]["executed"]["ok"] = True
    executed.write_text(json.dumps(nb))
    assert tutorial.stale_reason() is None
    os.utime(source, (executed.stat().st_mtime + 10,) * 2)
    assert tutorial.stale_reason() == "older than the notebook"


def test_readme_splits_into_home_and_one_guide_page_per_section() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    home, pages = hooks.split_readme(text)
    headings = [line[3:].strip() for line in _outside_fences(text) if line.startswith("## ")]
    assert [title for title, _, _ in pages] == headings and len(headings) >= 5
    assert home.startswith("# lightstream")
    assert len({slug for _, slug, _ in pages}) == len(pages)
    # a '# comment' inside a code block neither splits nor is promoted; '###' becomes '##'
    sample = "# T\nintro\n## A\n```python\n# code\n## not a heading\n```\n### Sub\n## B\nb\n"
    home, pages = hooks.split_readme(sample)
    assert home == "# T\nintro\n"
    assert pages[0] == ("A", "a", "# A\n```python\n# code\n## not a heading\n```\n## Sub\n")
    assert pages[1] == ("B", "b", "# B\nb\n")


def test_readme_links_to_notebooks_point_at_the_rendered_tutorials() -> None:
    text = "see [the quickstart](notebooks/01_quickstart.ipynb) and [x](https://example.org/notebooks/a.ipynb)"
    assert hooks._relink(text, 1) == ("see [the quickstart](../tutorials/01_quickstart.ipynb) and "
                                      "[x](https://example.org/notebooks/a.ipynb)")


def _outside_fences(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def test_anchor_links_follow_their_heading_to_its_guide_page() -> None:
    assert hooks.heading_anchor("Dense outputs (segmentation)") == "dense-outputs-segmentation"
    assert hooks.heading_anchor("`StreamingCNN` & friends") == "streamingcnn-friends"
    pages = {"index.md": "# T\nsee [dense](#dense-outputs-segmentation) and [t](#t)\n",
             "guide/a.md": "# A\n[here](#a) [there](#dense-outputs-segmentation) [home](#t) [gone](#nowhere)\n",
             "guide/dense-outputs-segmentation.md": "# Dense outputs (segmentation)\n```\n# not a heading\n```\n"}
    out = hooks.relink_anchors(pages)
    assert out["index.md"] == ("# T\nsee [dense](guide/dense-outputs-segmentation.md#dense-outputs-segmentation)"
                               " and [t](#t)\n")
    assert out["guide/a.md"] == ("# A\n[here](#a) [there](dense-outputs-segmentation.md#dense-outputs-segmentation)"
                                 " [home](../index.md#t) [gone](#nowhere)\n")



def test_api_pages_link_each_exported_name_where_it_is_defined() -> None:
    exported = hooks.exports("lightstream")
    assert exported["StreamingCNN"] == "lightstream.core.engine.StreamingCNN"      # through lightstream.core
    assert exported["StreamingModule"] == "lightstream.modules.streaming.StreamingModule"  # a lazy name
    pages = {path: text for _, path, text in hooks.api_pages()}
    assert "[`StreamingCNN`][lightstream.core.engine.StreamingCNN]" in pages["api/index.md"]
    core = pages["api/core.md"]
    assert core.index("::: lightstream.core.engine") < core.index("## Internal modules") < core.index(
        "::: lightstream.core.op_table")  # public modules first, in the order __init__ imports them
