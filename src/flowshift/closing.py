"""`Closing`: the `with` protocol of an object that owns something to release (a file, a
process pool, a loaded program): entering gives the object itself, leaving calls its
`close()`, whether the block ended normally or not. Written once here for every reader,
writer and runtime that is its own context manager."""

from __future__ import annotations

from typing import Self


class Closing:
    """Base of a class whose `with` block ends with `close()`; the class defines `close`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
