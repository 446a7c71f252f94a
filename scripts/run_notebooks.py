#!/usr/bin/env python
"""Execute the tutorial notebooks headless, papermill style, and keep the executed copies.

    python scripts/run_notebooks.py                 # every notebook, instructive (default) sizes
    python scripts/run_notebooks.py --small         # every notebook at CI sizes (what the tests run)
    python scripts/run_notebooks.py 01 03 --small   # some of them (number, name or path)
    python scripts/run_notebooks.py 01 -p IMAGE_SIZE=4096 -p EPOCHS=5

Each notebook has one code cell tagged ``parameters`` holding its defaults. The runner inserts a
cell tagged ``injected-parameters`` right after it (as papermill does) that sets ``OUTPUT_DIR``
(where the notebook saves its figures), the ``--small`` sizes of :data:`SMALL_PARAMETERS` and
any ``-p NAME=VALUE``; then it runs the notebook top to bottom in a fresh kernel started in the
notebooks' folder. The executed copy is written to ``OUTPUT/<name>.ipynb`` and the figures to
``OUTPUT/<name>/`` (``OUTPUT`` is ``output/notebooks`` by default, which git ignores), also
when a cell fails, so the copy shows where. The exit status is non-zero if any notebook failed.

The kernel gets the repository root on ``PYTHONPATH``, so the notebooks import this checkout's
``lightstream`` whether or not it is installed.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
DEFAULT_OUTPUT = REPO / "output" / "notebooks"
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

SMALL_PARAMETERS: dict[str, dict[str, Any]] = {
    "01_quickstart": {"IMAGE_SIZE": 512, "TILE_SIZE": 256, "N_TRAIN": 24, "N_VAL": 16, "EPOCHS": 3,
                      "PROGRESS_BAR": False},
    "02_choosing_a_tile_size": {"IMAGE_SIZE": 1024, "MEASURE_SIZE": 512, "MEMORY_BUDGET_GIB": 0.5},
    "03_whole_slide_images": {"SLIDE_SIZE": 4096, "N_SLIDES": 2, "TILE_SIZE": 512},
    "04_your_own_model": {"IMAGE_SIZE": 192, "TILE_SIZE": 128},
    "05_scaling_up": {"IMAGE_SIZE": 256, "TILE_SIZE": 128, "N_TRAIN": 8, "N_VAL": 4, "EPOCHS": 2,
                      "PROGRESS_BAR": False},
    "06_segmentation": {"SLIDE_SIZE": 512, "N_TRAIN": 6, "N_VAL": 2, "TILE_SIZE": 160, "EPOCHS": 5,
                        "PROGRESS_BAR": False},
}
"""CI sizes per notebook (by file stem): small enough that all of them run in a few minutes on 2 cores."""

logger = logging.getLogger("run_notebooks")


@dataclass
class NotebookRun:
    """The outcome of one notebook: where its copy and figures went, how long it took, any error."""

    notebook: Path
    executed: Path
    figures: Path
    seconds: float = 0.0
    error: str | None = None
    figure_files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


class NotebookError(RuntimeError):
    """A notebook failed; the message names the notebook, the cell and the error."""


def notebook_paths(selection: Sequence[str] = ()) -> list[Path]:
    """The notebooks to run: all of ``notebooks/*.ipynb`` in order, or those ``selection`` names.

    A name is a path, a file name, a stem, or a unique prefix such as ``01``.
    """
    available = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not selection:
        return available
    chosen = []
    for name in selection:
        path = Path(name)
        if path.suffix == ".ipynb" and path.exists():
            chosen.append(path.resolve())
            continue
        matches = [p for p in available if p.stem == path.stem or p.name.startswith(name)]
        if len(matches) != 1:
            names = ", ".join(p.stem for p in available)
            raise SystemExit(f"{name!r} matches {len(matches)} notebooks; choose one of: {names}")
        chosen.append(matches[0])
    return chosen


def inject_parameters(nb: nbformat.NotebookNode, parameters: Mapping[str, Any], source_name: str) -> None:
    """Insert a cell assigning ``parameters`` after the cell tagged ``parameters`` (papermill style).

    Without a tagged cell the assignments go first. An earlier injected cell is replaced.
    """
    nb.cells = [cell for cell in nb.cells if INJECTED_TAG not in cell.get("metadata", {}).get("tags", [])]
    lines = [f"# Parameters injected by scripts/run_notebooks.py ({source_name})"]
    lines += [f"{name} = {value!r}" for name, value in parameters.items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": [INJECTED_TAG]})
    tagged = [i for i, c in enumerate(nb.cells) if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    nb.cells.insert(tagged[0] + 1 if tagged else 0, cell)


def kernel_environment(threads: int | None = None) -> dict[str, str]:
    """Environment of the kernel: this one, with the repository on ``PYTHONPATH``.

    ``threads`` sets ``OMP_NUM_THREADS`` (PyTorch's intra-op threads), e.g. 1 on a machine shared
    with other jobs, where spinning OpenMP threads can slow small convolutions down many times.
    """
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    paths = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silence the debugger's frozen-modules note
    return env


def run_notebook(
    notebook: str | Path,
    parameters: Mapping[str, Any] | None = None,
    *,
    small: bool = False,
    output_dir: str | Path = DEFAULT_OUTPUT,
    figure_dir: str | Path | None = None,
    executed_path: str | Path | None = None,
    timeout: int = 1200,
    kernel_name: str | None = None,
    threads: int | None = None,
) -> NotebookRun:
    """Execute one notebook with injected parameters; raises :class:`NotebookError` if a cell fails.

    Args:
        notebook: path of the ``.ipynb``.
        parameters: overrides of the notebook's ``parameters`` cell (after the small ones).
        small: use the notebook's :data:`SMALL_PARAMETERS` (CI sizes).
        output_dir: the executed copy goes to ``output_dir/<stem>.ipynb``.
        figure_dir: the notebook's ``OUTPUT_DIR``; default ``output_dir/<stem>/``.
        executed_path: where to write the executed copy instead.
        timeout: seconds one cell may run.
        kernel_name: Jupyter kernel; default the notebook's (``python3``: this interpreter).
        threads: PyTorch threads in the kernel (``OMP_NUM_THREADS``); default PyTorch's choice.
    """
    path = Path(notebook).resolve()
    output_dir = Path(output_dir).resolve()
    figures = Path(figure_dir).resolve() if figure_dir is not None else output_dir / path.stem
    executed = Path(executed_path).resolve() if executed_path is not None else output_dir / path.name
    figures.mkdir(parents=True, exist_ok=True)
    executed.parent.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {"OUTPUT_DIR": str(figures)}
    if small:
        values.update(SMALL_PARAMETERS.get(path.stem, {}))
    values.update(parameters or {})

    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, values, "small" if small else "default sizes")
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_name or nb.metadata.get("kernelspec", {}).get("name", "python3"),
        resources={"metadata": {"path": str(path.parent)}}, allow_errors=False, record_timing=True,
    )
    run = NotebookRun(path, executed, figures)
    start = time.perf_counter()
    try:
        client.execute(env=kernel_environment(threads))
    except CellExecutionError as error:
        run.error = f"{path.name}: a cell failed:\n{_error_summary(nb, error)}"
    except (CellTimeoutError, DeadKernelError) as error:
        run.error = f"{path.name}: {type(error).__name__}: {error}"
    finally:
        run.seconds = time.perf_counter() - start
        nb.metadata.setdefault("lightstream", {})["executed"] = {
            "seconds": round(run.seconds, 1), "parameters": _jsonable(values), "ok": run.error is None}
        nbformat.write(nb, executed)
    run.figure_files = sorted(p for p in figures.rglob("*") if p.suffix in {".png", ".svg", ".pdf"})
    if run.error is not None:
        raise NotebookError(f"{run.error}\n(executed copy with the failing cell: {executed})")
    return run


def _error_summary(nb: nbformat.NotebookNode, error: CellExecutionError, context: int = 25) -> str:
    """The failing cell's index and first lines, the error, and the end of its traceback."""
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                head = "\n".join(f"    {line}" for line in cell.source.splitlines()[:6])
                trace = _ANSI.sub("", "\n".join(output.get("traceback", []))).splitlines()
                tail = "\n".join(trace[-context:])
                return (f"cell {index}, which begins:\n{head}\nraised {output.get('ename')}: "
                        f"{_ANSI.sub('', str(output.get('evalue')))}\n--- end of the traceback ---\n{tail}")
    return _ANSI.sub("", str(error))


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v) for k, v in values.items()}


def _parse_parameter(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value  # a plain string


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (number, name or path); default all")
    parser.add_argument("--small", action="store_true", help="CI sizes (SMALL_PARAMETERS), a few minutes in all")
    parser.add_argument("-p", "--parameter", action="append", default=[], type=_parse_parameter,
                        metavar="NAME=VALUE", help="override a parameter (Python literal or plain string)")
    parser.add_argument("-o", "--output-dir", type=Path, default=DEFAULT_OUTPUT,
                        help=f"executed copies and figures (default {DEFAULT_OUTPUT.relative_to(REPO)})")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds a single cell may run")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch threads in the kernels (OMP_NUM_THREADS); default: PyTorch's choice")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing notebook")
    parser.add_argument("--list", action="store_true", help="list the notebooks and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = notebook_paths(args.notebooks)
    if args.list:
        for path in paths:
            print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
        return 0
    if not paths:
        print(f"no notebooks found in {NOTEBOOKS}", file=sys.stderr)
        return 1
    overrides = dict(args.parameter)
    runs: list[NotebookRun] = []
    failures: list[str] = []
    total = time.perf_counter()
    for path in paths:
        logger.info("running %s%s ...", path.name, " (small)" if args.small else "")
        try:
            run = run_notebook(path, overrides, small=args.small, output_dir=args.output_dir, timeout=args.timeout,
                               threads=args.threads)
        except NotebookError as error:
            failures.append(str(error))
            logger.error("FAILED %s\n%s", path.name, error)
            if args.fail_fast:
                break
            continue
        runs.append(run)
        logger.info("  ok in %.1f s -> %s (%d figures in %s)", run.seconds, _short(run.executed),
                    len(run.figure_files), _short(run.figures))
    logger.info("%d of %d notebooks ran in %.1f s", len(runs), len(paths), time.perf_counter() - total)
    if failures:
        logger.error("%d notebook(s) failed: %s", len(failures), ", ".join(f.split(":")[0] for f in failures))
        return 1
    return 0


def _short(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


if __name__ == "__main__":
    sys.exit(main())
