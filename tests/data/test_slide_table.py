"""Slide tables: every bad row is reported (line and reason) before anything trains; splits round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightstream.data import SlideRecord, SlideTableError, read_slide_table, write_slide_table


def _table(folder: Path, text: str, slides: tuple[str, ...] = ("a.tif", "b.tif", "c.tif")) -> Path:
    for name in slides:
        (folder / name).write_bytes(b"")
    table = folder / "slides.csv"
    table.write_text(text)
    return table


def _problems(table: Path) -> SlideTableError:
    with pytest.raises(SlideTableError) as raised:
        read_slide_table(table)
    return raised.value


def test_every_bad_row_is_named_with_its_line_and_reason(tmp_path: Path) -> None:
    table = _table(tmp_path, "path,label\na.tif,1\nmissing.tif,0\nb.tif,\nc.tif,nan\na.tif,0\n")
    error = _problems(table)
    assert error.problems == [
        f"line 3: slide file not found: {tmp_path / 'missing.tif'}",
        "line 4: the label is empty",
        "line 5: label 'nan' is not a finite number",
        "line 6: slide 'a.tif' is listed twice (also on line 2)",
    ]
    assert str(error).startswith(f"slide table {table} has 4 bad row(s)")
    assert f"{table}, line 3: slide file not found" in str(error)


def test_class_names_map_to_indices_and_unknown_names_are_rejected(tmp_path: Path) -> None:
    table = _table(tmp_path, "path,label\na.tif,tumour\nb.tif,normal\nc.tif,1\n")
    records = read_slide_table(table, classes=["normal", "tumour"])
    assert [record.label for record in records] == [1, 0, 1]
    with pytest.raises(SlideTableError, match=r"line 3: label 'normal' is not one of the classes \['tumor'\]"):
        read_slide_table(table, classes=["tumor"])


def test_a_missing_mask_and_an_unknown_split_are_rejected(tmp_path: Path) -> None:
    table = _table(tmp_path, "path,label,mask,split\na.tif,1,a_mask.tif,train\nb.tif,0,,validation\n")
    assert _problems(table).problems == [
        f"line 2: mask file not found: {tmp_path / 'a_mask.tif'}",
        "line 3: split 'validation' is not one of train, val, test (or empty)",
    ]


def test_check_files_false_reads_a_table_of_slides_elsewhere(tmp_path: Path) -> None:
    table = tmp_path / "slides.csv"
    table.write_text("path,label\nnot_here.tif,1\n")
    assert read_slide_table(table, check_files=False) == [SlideRecord(tmp_path / "not_here.tif", 1)]


def test_splits_are_written_and_read_back(tmp_path: Path) -> None:
    _table(tmp_path, "")
    records = [SlideRecord(tmp_path / "a.tif", 1, split="train"), SlideRecord(tmp_path / "b.tif", 0, split=None),
               SlideRecord(tmp_path / "c.tif", 0, split="test")]
    write_slide_table(tmp_path / "out.csv", records)
    assert (tmp_path / "out.csv").read_text().splitlines() == ["path,label,split", "a.tif,1,train", "b.tif,0,",
                                                                "c.tif,0,test"]
    assert read_slide_table(tmp_path / "out.csv") == records
