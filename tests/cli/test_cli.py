"""The ``lightstream`` command end to end: printed config -> fit writes a checkpoint -> predict writes
the scores CSV and one heatmap PNG per slide, with the checkpoint's weights."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from lightstream.cli import main
from lightstream.data import write_synthetic_dataset
from lightstream.data.datamodule import SlideDataModule
from lightstream.models import SlideAttentionMIL

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """``main(args)`` parses ``args``, as the console script parses its command line (not pytest's)."""
    monkeypatch.setattr(sys, "argv", ["lightstream"])


@pytest.fixture(scope="module")
def slide_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    write_synthetic_dataset(folder, n=6, size=(384, 384), seed=1, lesion_radius=48, workers=1)
    return folder / "labels.csv"


def _printed_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> dict:
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--print_config"])
    assert exited.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_is_complete_and_names_every_group(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _printed_config(tmp_path, capsys)
    assert {"trainer", "model", "data", "checkpoint", "predictions", "seed_everything", "ckpt_path"} <= set(config)
    assert config["model"]["class_path"] == "lightstream.models.SlideAttentionMIL"
    assert {"backbone", "tile_size", "weights", "stage_memory", "instance_classifier"} <= set(
        config["model"]["init_args"])
    assert "num_classes" not in config["model"]["init_args"]  # linked from the data's classes
    assert config["data"]["table"] is None and config["data"]["augmentation"]["flips"] is True
    assert config["checkpoint"].items() >= {"dirpath": "checkpoints", "save_last": True, "monitor": "val_auc"}.items()


@pytest.mark.slow
def test_fit_then_predict_from_the_printed_config(slide_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch, single_torch_thread: None) -> None:
    config = _printed_config(tmp_path, capsys)
    config["data"].update(table=str(slide_table), level=1, thumbnail_size=128, val_fraction=0.34)
    config["model"]["init_args"].update(backbone="small_cnn", tile_size=96)
    config["trainer"].update(accelerator="cpu", enable_model_summary=False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)

    main(["fit", "--config", "config.yaml", "--trainer.max_epochs", "1"])
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()

    capsys.readouterr()
    main(["predict", "--config", "config.yaml", "--ckpt_path", str(checkpoint)])
    assert "Predicting DataLoader 0: 100%|██████████| 6/6" in capsys.readouterr().out  # a tqdm bar over the slides
    with (tmp_path / "predictions" / "scores.csv").open() as file:
        rows = list(csv.DictReader(file))
    slides = SlideDataModule(str(slide_table)).records
    assert [row["slide"] for row in rows] == [str(record.path) for record in slides]
    assert [row["label"] for row in rows] == [str(record.label) for record in slides]
    assert list(rows[0]) == ["slide", "label", "predicted", "score_0", "score_1", "heatmap"]
    for row in rows:
        assert abs(float(row["score_0"]) + float(row["score_1"]) - 1) < 1e-5
        assert row["predicted"] == str(int(float(row["score_1"]) > float(row["score_0"])))
        with Image.open(tmp_path / "predictions" / row["heatmap"]) as png:
            assert png.format == "PNG" and min(png.size) > 100
    assert rows[0]["heatmap"] == "slide_000_attention.png"

    # the scores are the checkpoint's model on the un-augmented slide
    model = SlideAttentionMIL(backbone="small_cnn", tile_size=96, num_classes=2)
    model.load_state_dict(torch.load(checkpoint, weights_only=False)["state_dict"])
    sample = SlideDataModule(str(slide_table), level=1, thumbnail_size=128).dataset(None)[0]
    with torch.no_grad():
        expected = model.eval()(sample.image).softmax(-1)[0]
    assert abs(float(rows[0]["score_1"]) - expected[1].item()) < 1e-5


def test_a_bad_table_stops_fit_before_training_naming_the_row(tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text("path,label\nnowhere.tif,1\n")
    with pytest.raises(Exception, match="line 2: slide file not found"):
        main(["fit", "--data.table", str(table), "--trainer.max_epochs", "1"])


@pytest.mark.slow
def test_python_dash_m_lightstream_is_the_console_command() -> None:
    result = subprocess.run([sys.executable, "-m", "lightstream", "--help"], capture_output=True, text=True,
                            cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ("fit", "validate", "test", "predict"))
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'lightstream = "lightstream.cli:main"' in pyproject
