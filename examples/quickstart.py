"""Run the quickstart notebook (notebooks/01_quickstart.ipynb) headless and save its figures.

    python examples/quickstart.py                  # instructive CPU-friendly sizes: a few minutes
    python examples/quickstart.py --small          # CI sizes: well under a minute
    python examples/quickstart.py -p IMAGE_SIZE=8192 -p TILE_SIZE=2048   # e.g. on a GPU

It trains a small streamed CNN with a Lightning Trainer on synthetic 4-megapixel images whose
label hides in 2-px checkerboards, checks that the accuracy ends far above chance, and writes the
executed notebook and its figures (tile grid, learning curves, memory) to ``output/quickstart/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "output" / "quickstart"
sys.path.insert(0, str(REPO / "scripts"))

import run_notebooks as runner  # scripts/run_notebooks.py: the notebook runner CI uses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CI sizes instead of the notebook's defaults")
    parser.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                        type=runner._parse_parameter, help="override a parameter of the notebook")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (OMP_NUM_THREADS)")
    args = parser.parse_args()
    notebook = REPO / "notebooks" / "01_quickstart.ipynb"
    overrides = dict(args.parameter)
    print(f"running {notebook.relative_to(REPO)} headless"
          f"{' at CI sizes' if args.small else ''}{f' with {overrides}' if overrides else ''} ...", flush=True)
    try:
        run = runner.run_notebook(notebook, overrides, small=args.small, output_dir=OUTPUT, figure_dir=OUTPUT,
                                  threads=args.threads)
    except runner.NotebookError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"done in {run.seconds:.0f} s")
    print(f"executed notebook: {run.executed}")
    print(f"figures ({len(run.figure_files)}) in {run.figures}:")
    for path in run.figure_files:
        print(f"  {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
