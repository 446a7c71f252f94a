"""Build or serve the documentation site (MkDocs, strict): the guide, the API reference, the tutorials.

Usage (``scripts/docs.sh`` runs this with the project's ``.venv``)::

    python scripts/docs.py build            # strict build into site/, then check the tutorials' figures
    python scripts/docs.py serve            # the same site at http://127.0.0.1:8000, rebuilt on edits
    python scripts/docs.py serve -a 0.0.0.0:8000
    python scripts/docs.py tutorials        # only refresh docs/tutorials/

The tutorials are the notebooks executed at CI sizes: ``scripts/run_notebooks.py --small`` (the
notebook test) leaves executed copies in ``output/notebooks/``. Each is copied into the gitignored
``docs/tutorials/``; one that is missing, failed, or older than its notebook is executed first (one
PyTorch thread, as the test does). Notebooks are found by ``notebooks/NN_*.ipynb``, so a new one
is picked up by itself.

``mkdocs build --strict`` fails on a broken link or anchor in the guide and on a docstring
cross-reference that resolves nowhere (``docs/griffe_sphinx_roles.py``). After the build, every
tutorial page must show its notebook's figures: at least one embedded PNG, and as many as the
executed notebook has PNG figure outputs; otherwise the build fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
TUTORIALS = DOCS / "tutorials"
SITE = REPO / "site"
CONFIG = REPO / "mkdocs.yml"
sys.path.insert(0, str(REPO / "scripts"))

import run_notebooks as runner

logger = logging.getLogger("docs")
_PNG_IMG = re.compile(r"<img\b[^>]*\bsrc=\"data:image/png;base64,[A-Za-z0-9+/=]{100,}")


BUILD_OPTIONS: tuple[str, ...] = ()
"""Options of ``mkdocs build`` besides ``--strict`` (not ``--quiet``: it hides the warnings strict mode counts)."""


class DocsError(RuntimeError):
    """The docs could not be built: a notebook failed, mkdocs failed, or a tutorial page lacks figures."""


@dataclass(frozen=True)
class Tutorial:
    """One notebook: its source, its executed copy (``output/notebooks``) and its copy in ``docs/tutorials``."""

    source: Path
    executed: Path
    page: Path

    def stale_reason(self) -> str | None:
        """Why the executed copy cannot be used (missing, failed, older than the notebook), or None."""
        if not self.executed.exists():
            return "not executed yet"
        if self.executed.stat().st_mtime < self.source.stat().st_mtime:
            return "older than the notebook"
        try:
            meta = json.loads(self.executed.read_text(encoding="utf-8"))["metadata"]
        except (OSError, ValueError, KeyError) as error:
            return f"unreadable ({error})"
        if not meta.get("lightstream", {}).get("executed", {}).get("ok", False):
            return "its last run failed"
        return None


def tutorials(output_dir: Path = runner.DEFAULT_OUTPUT, docs_dir: Path = DOCS) -> list[Tutorial]:
    """Every numbered notebook with where its executed copy and its docs copy live."""
    return [Tutorial(p, output_dir / p.name, docs_dir / "tutorials" / p.name) for p in runner.notebook_paths()]


def prepare_tutorials(output_dir: Path = runner.DEFAULT_OUTPUT, docs_dir: Path = DOCS, *,
                      execute: bool = True, threads: int = 1) -> list[Path]:
    """Copy the executed notebooks into ``docs_dir/tutorials`` (executing stale ones first); return the copies."""
    folder = docs_dir / "tutorials"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = tutorials(output_dir, docs_dir)
    for old in folder.glob("*.ipynb"):
        if old.name not in {t.page.name for t in wanted}:
            old.unlink()  # its notebook was removed or renamed
    for tutorial in wanted:
        reason = tutorial.stale_reason()
        if reason is not None:
            if not execute:
                raise DocsError(f"{tutorial.executed}: {reason}; run scripts/run_notebooks.py --small")
            logger.info("executing %s (%s) ...", tutorial.source.name, reason)
            try:
                runner.run_notebook(tutorial.source, small=True, output_dir=output_dir, threads=threads)
            except runner.NotebookError as error:
                raise DocsError(str(error)) from error
        shutil.copy2(tutorial.executed, tutorial.page)
    return [t.page for t in wanted]


def png_outputs(notebook: Path) -> int:
    """How many outputs of the executed notebook are PNG figures (a PNG with at most a text fallback).

    Those must render as images. A PNG beside a richer type (a widget view, HTML) is left out: the
    HTML converter shows the richer one when it can, e.g. a widget whose state the notebook saved.
    """
    cells = json.loads(notebook.read_text(encoding="utf-8")).get("cells", [])
    return sum("image/png" in output.get("data", {}) and set(output["data"]) <= {"image/png", "text/plain"}
               for cell in cells for output in cell.get("outputs", []))


def check_tutorial_figures(notebooks: Sequence[Path], site_dir: Path = SITE) -> list[str]:
    """Problems with the rendered tutorials: a page missing, or showing fewer PNG figures than its notebook."""
    problems = []
    for notebook in notebooks:
        page = site_dir / "tutorials" / notebook.stem / "index.html"
        if not page.exists():
            problems.append(f"{notebook.name}: no rendered page at {page}")
            continue
        shown = len(_PNG_IMG.findall(page.read_text(encoding="utf-8")))
        expected = png_outputs(notebook)
        if expected == 0:
            problems.append(f"{notebook.name}: the executed notebook has no figure output")
        elif shown < expected:
            problems.append(f"{page}: shows {shown} PNG figures, the notebook has {expected}")
    return problems


def mkdocs(command: str, *args: str, config: Path = CONFIG) -> None:
    """Run ``mkdocs <command> --strict -f <config>`` with this interpreter; raise DocsError if it fails."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    cmd = [sys.executable, "-m", "mkdocs", command, "--strict", "-f", str(config), *args]
    logger.info("%s", " ".join(cmd[2:]))
    if subprocess.run(cmd, check=False, cwd=config.parent, env=env).returncode != 0:
        raise DocsError(f"mkdocs {command} --strict failed (messages above)")


def build_site(config: Path = CONFIG, site_dir: Path = SITE, *extra: str) -> None:
    """``mkdocs build --strict`` of ``config`` into ``site_dir``; raises DocsError on any warning."""
    mkdocs("build", *BUILD_OPTIONS, "--site-dir", str(site_dir), *extra, config=config)


def build(*, execute: bool = True, extra: Sequence[str] = ()) -> Path:
    """Refresh the tutorials, build the site strictly into ``site/``, check the tutorials' figures."""
    start = time.perf_counter()
    pages = prepare_tutorials(execute=execute)
    build_site(CONFIG, SITE, *extra)
    problems = check_tutorial_figures(pages)
    if problems:
        raise DocsError("tutorial pages without their figures:\n  " + "\n  ".join(problems))
    logger.info("docs built in %.1f s: %s (%d tutorials with their figures)", time.perf_counter() - start,
                SITE / "index.html", len(pages))
    return SITE


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("command", choices=["build", "serve", "tutorials"])
    parser.add_argument("--no-execute", action="store_true",
                        help="fail instead of executing notebooks whose executed copy is missing or stale")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="docs: %(message)s")
    try:
        if args.command == "build":
            build(execute=not args.no_execute, extra=extra)
        elif args.command == "tutorials":
            prepare_tutorials(execute=not args.no_execute)
        else:
            prepare_tutorials(execute=not args.no_execute)
            mkdocs("serve", *extra)
    except DocsError as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
