"""Errors of the slide data layer; each message names the file and what was wrong with it."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "SlideError",
    "SlideNotFoundError",
    "UnsupportedSlideError",
    "SlideLevelError",
    "MaskMismatchError",
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
