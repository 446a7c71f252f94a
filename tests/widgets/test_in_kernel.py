"""The widgets in a real Jupyter kernel (nbclient): they display as widget views, the monitor goes live."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[2]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

TRAIN = '''
import lightning as L, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightstream.widgets import MemoryMonitor, in_notebook_kernel

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

monitor = MemoryMonitor(refresh_s=0.0)
data = TensorDataset(torch.rand(8, 3, 16, 16), torch.randint(0, 2, (8,)))
trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])
trainer.fit(Tiny(), DataLoader(data, batch_size=2))
print("history", len(monitor.history), in_notebook_kernel(), monitor.image is not None)
'''

TUNER = '''
from lightstream.widgets import TileTuner
trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 4, 3, padding=1)).eval()
tuner = TileTuner(trunk, torch.rand(1, 3, 128, 128), [4, 8, 16, 32])
tuner
'''


@pytest.mark.slow
def test_widgets_display_in_a_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in (TRAIN, TUNER)])
    client = NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    train, tuner = notebook.cells
    printed = "".join(o.get("text", "") for o in train.outputs if o.output_type == "stream")
    assert "history 3 True True" in printed
    assert any(WIDGET_VIEW in o.get("data", {}) for o in train.outputs)  # the live plot under the cell
    assert any(WIDGET_VIEW in o.get("data", {}) for o in tuner.outputs)
