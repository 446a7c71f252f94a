"""The tile cache: a JSON record keyed by architecture, tile size and dtype, checked on load."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightstream.modules import TileCache
from streaming_helpers import TILE, AutogradStyle, tiny_head, tiny_trunk

LOGGER = "lightstream.modules"


def _model(tmp_path, **kwargs) -> AutogradStyle:
    return AutogradStyle(tiny_trunk(), tiny_head(), tile_cache_dir=tmp_path, **kwargs)


def test_no_cache_file_is_written_by_default(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = AutogradStyle(tiny_trunk(), tiny_head())
    assert model.tile_cache_path is None and model.save_tile_cache_if_needed(overwrite=True) is None
    assert list(tmp_path.iterdir()) == []


def test_the_cache_records_the_plan_summary_under_its_key(tmp_path) -> None:
    model = _model(tmp_path)
    path = model.tile_cache_path
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]
    record = json.loads(path.read_text())
    geometry = model.stream_network.geometry
    assert path.name == f"tile_cache_{record['key']}.json"
    assert record["tile_size"] == [TILE, TILE]
    assert record["receptive_field"] == list(geometry.receptive_field) == [15, 15]
    assert record["output_stride"] == list(geometry.output_stride) == [4, 4]
    assert record["tile_stride"] == list(model.configure_tile_stride())
    assert record["geometry_fingerprint"] == geometry.fingerprint
    assert record["dtype"] == "float64"
    assert model.load_tile_cache_if_needed() == TileCache.read(path)


def test_the_key_changes_with_tile_size_dtype_and_architecture(tmp_path) -> None:
    keys = {_model(tmp_path).tile_cache_path.name}
    keys.add(_model(tmp_path).tile_cache_path.name)  # same model: same key
    model = _model(tmp_path)
    model.tile_size = 20
    keys.add(model.tile_cache_path.name)
    model.trainer = SimpleNamespace(precision="bf16-mixed")
    keys.add(model.tile_cache_path.name)
    wider = tiny_trunk()
    wider[6] = torch.nn.Conv2d(4, 7, 3, padding=1).double()
    keys.add(AutogradStyle(wider, tiny_head(), tile_cache_dir=tmp_path).tile_cache_path.name)
    assert len(keys) == 4
    assert len(list(tmp_path.glob("tile_cache_*.json"))) == 3  # the bf16 record is written at a run's start


def test_a_stale_cache_is_logged_and_rebuilt(tmp_path, caplog) -> None:
    _model(tmp_path, tile_cache_fname="cache.json")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = _model(tmp_path, tile_cache_fname="cache.json", tile_size=20)
    assert "stale (tile_size, tile_stride differ" in caplog.text
    assert json.loads((tmp_path / "cache.json").read_text())["tile_size"] == [20, 20]
    assert model.load_tile_cache_if_needed() is not None


@pytest.mark.parametrize("content", [b"\x80\x04legacy torch.save pickle", b"{not json", b'{"format": 99}'])
def test_an_unreadable_cache_is_never_unpickled_and_is_rebuilt(tmp_path, caplog, monkeypatch, content) -> None:
    (tmp_path / "cache.json").write_bytes(content)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load was called"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = _model(tmp_path, tile_cache_fname="cache.json")
    assert "not a lightstream tile cache" in caplog.text
    assert model.load_tile_cache_if_needed() is not None


def test_only_global_rank_zero_writes_the_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    model = _model(tmp_path)
    assert model.save_tile_cache_if_needed(overwrite=True) is None
    assert list(tmp_path.iterdir()) == []


def test_a_missing_cache_directory_is_an_error(tmp_path) -> None:
    with pytest.raises(NotADirectoryError, match="missing"):
        _model(tmp_path / "missing")
