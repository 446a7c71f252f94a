"""Every tutorial notebook runs top to bottom, headless, at CI sizes (``run_notebooks.py --small``).

One test per notebook, so a failure names it; the message shows the failing cell and its error,
and the executed copy (with that cell's traceback) is kept in ``output/notebooks/``.

The kernels use one PyTorch thread (``--threads 1``): at CI sizes that is about as fast as two,
and it keeps the run time predictable on shared runners, where spinning OpenMP threads can slow
small convolutions down tens of times. Each takes well under a minute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import run_notebooks as runner  # scripts/run_notebooks.py, the runner CI uses

NOTEBOOKS = runner.notebook_paths()


def test_notebooks_are_numbered_01_to_n_with_a_parameters_cell_and_no_outputs() -> None:
    import nbformat

    assert len(NOTEBOOKS) >= 6
    assert [p.stem[:2] for p in NOTEBOOKS] == [f"{n:02d}" for n in range(1, len(NOTEBOOKS) + 1)]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if runner.PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters'"
        assert "OUTPUT_DIR" in tagged[0].source, f"{path.name}: the parameters cell must define OUTPUT_DIR"
        for name in runner.SMALL_PARAMETERS.get(path.stem, {}):
            assert f"{name} =" in tagged[0].source, f"{path.name}: small parameter {name} is not a parameter"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
            f"{path.name} is committed with outputs; clear them (Edit > Clear Outputs of All Cells)")


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(notebook: Path) -> None:
    try:
        run = runner.run_notebook(notebook, small=True, timeout=600, threads=1)
    except runner.NotebookError as error:
        pytest.fail(str(error), pytrace=False)
    assert run.executed.exists()
    assert run.figure_files, f"{notebook.name} saved no figures to {run.figures}"
    _assert_quiet_single_outputs(run.executed)

    if notebook.stem == "01_quickstart":
        _assert_the_accuracy_starts_at_chance_and_rises(run.figures / "learning_curves.json")


def _assert_quiet_single_outputs(executed: Path) -> None:
    """No log lines, warnings or bars on stderr, and no figure shown twice in a notebook."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    seen: dict[str, int] = {}
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                assert output["name"] != "stderr", f"{executed.name} cell {index} wrote to stderr: {output['text'][:300]}"
            png = output.get("data", {}).get("image/png")
            if png:
                assert png not in seen, f"{executed.name}: cell {index} shows the figure of cell {seen[png]} again"
                seen[png] = index


def _assert_the_accuracy_starts_at_chance_and_rises(path: Path) -> None:
    """The quickstart's story at CI sizes: near chance before training, clearly above it after."""
    story = json.loads(path.read_text())
    start = story["before"]["val_acc"]
    accuracies = [epoch["val_acc"] for epoch in story["epochs"]]
    assert start <= 0.7, f"the untrained model scores {start:.2f}, not near chance (0.5)"
    assert accuracies[-1] >= start + 0.15, f"the validation accuracy does not rise: {start:.2f} -> {accuracies}"
    assert story["epochs"][-1]["val_loss"] < story["before"]["val_loss"]
