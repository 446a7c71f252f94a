"""Errors of the slide data layer; each message names the file and what was wrong with it."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "SlideError",
    "SlideNotFoundError",
    "UnsupportedSlideError",
    "SlideLevelError",
    "MaskMismatchError",
    "SlideTableError",
]


class SlideError(Exception):
    """Base class of the errors raised about a slide or mask file.

    Attributes:
        path: the file the error is about.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide (or mask) file does not exist."""


class UnsupportedSlideError(SlideError, ValueError):
    """The file exists but OpenSlide (or the mask reader) cannot read it."""


class SlideLevelError(SlideError, ValueError):
    """The requested pyramid level or resolution (mpp) cannot be served by the slide."""


class MaskMismatchError(SlideError, ValueError):
    """A mask's size or aspect ratio does not match its slide.

    Attributes:
        path: the mask file.
        slide_path: the slide it was paired with.
    """

    def __init__(self, path: str | Path, slide_path: str | Path, message: str) -> None:
        self.slide_path = Path(slide_path)
        super().__init__(path, message)


class SlideTableError(ValueError):
    """A slide table has rows that cannot be used; the message lists every bad row and why.

    Attributes:
        path: the table (CSV) file.
        problems: one ``"line N: reason"`` string per bad row.
    """

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = Path(path)
        self.problems = problems
        listed = "\n".join(f"  {self.path}, {problem}" for problem in problems)
        super().__init__(f"slide table {self.path} has {len(problems)} bad row(s); fix them and retry:\n{listed}")
