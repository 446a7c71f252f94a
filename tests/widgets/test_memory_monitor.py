"""MemoryMonitor: a Lightning callback recording memory and step time."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightstream.widgets import MemoryMonitor, in_notebook_kernel


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(monitor: MemoryMonitor, tmp_path: Path, steps: int = 3, **trainer_args: object) -> L.Trainer:
    data = TensorDataset(torch.rand(8, 3, 16, 16), torch.randint(0, 2, (8,)))
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    trainer = L.Trainer(max_steps=steps, devices=1, callbacks=[monitor],
                        default_root_dir=tmp_path, **{**defaults, **trainer_args})
    trainer.fit(Tiny(), DataLoader(data, batch_size=2))
    return trainer


def test_records_every_step_on_cpu(tmp_path: Path) -> None:
    monitor = MemoryMonitor()
    fit(monitor, tmp_path)
    assert [s.step for s in monitor.history] == [0, 1, 2]
    for sample in monitor.history:
        assert sample.rss > 0 and sample.step_time > 0 and sample.elapsed > 0
        assert sample.allocated is None and sample.peak_allocated is None and sample.reserved is None
    assert monitor.history[0].elapsed < monitor.history[-1].elapsed
    assert monitor.image is None  # not in a notebook kernel: no live plot


def test_logs_through_logging_and_the_trainer_logger(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monitor = MemoryMonitor(log_every_n_steps=1)
    with caplog.at_level(logging.INFO, logger="lightstream.widgets.memory"):
        fit(monitor, tmp_path, logger=CSVLogger(tmp_path, name="run"))
    messages = [r.getMessage() for r in caplog.records if r.name == "lightstream.widgets.memory"]
    assert sum(m.startswith("step ") for m in messages) == 3
    assert any(m.startswith("memory monitor: 3 steps") for m in messages)
    (metrics,) = tmp_path.glob("run/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert [float(r["memory/rss_gib"]) > 0 for r in rows if r.get("memory/rss_gib")] == [True] * 3
    assert any(r.get("time/step_s") for r in rows)


def test_history_restarts_with_each_fit(tmp_path: Path) -> None:
    monitor = MemoryMonitor()
    fit(monitor, tmp_path, steps=2)
    fit(monitor, tmp_path, steps=3)
    assert len(monitor.history) == 3


def test_live_plot_is_a_png_widget(tmp_path: Path) -> None:
    monitor = MemoryMonitor(live=True, refresh_s=0.0)
    fit(monitor, tmp_path)
    assert monitor.image is not None and bytes(monitor.image.value).startswith(b"\x89PNG")
    assert not in_notebook_kernel()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_records_gpu_memory_on_cuda(tmp_path: Path) -> None:
    monitor = MemoryMonitor()
    fit(monitor, tmp_path, accelerator="gpu")
    for sample in monitor.history:
        assert sample.peak_allocated >= sample.allocated > 0 and sample.reserved >= sample.allocated


class Scratch(Tiny):
    """A step that holds a 16 MiB temporary on top of a tiny model."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        scratch = torch.ones(4 << 20)  # 16 MiB of float32
        return super().training_step(batch, batch_idx) + 0 * scratch.sum()


def test_records_the_steps_tensor_peak_on_the_cpu(tmp_path: Path) -> None:
    monitor = MemoryMonitor(tensor_peak=True)
    data = TensorDataset(torch.rand(4, 3, 16, 16), torch.randint(0, 2, (4,)))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, callbacks=[monitor], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(Scratch(), DataLoader(data, batch_size=2))
    for sample in monitor.history:
        assert 16 << 20 <= sample.tensor_peak < (16 << 20) + (1 << 20)  # the temporary, plus a tiny model's
        assert sample.rss > sample.tensor_peak


@pytest.mark.parametrize("setting", [False, None])  # None: on CUDA only, so not on this CPU run
def test_no_tensor_peak_when_asked_not_to_or_by_default_on_the_cpu(tmp_path: Path, setting: bool | None) -> None:
    monitor = MemoryMonitor(tensor_peak=setting)
    fit(monitor, tmp_path, steps=1)
    assert monitor.history[0].tensor_peak is None
