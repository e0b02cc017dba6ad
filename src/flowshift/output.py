"""Output files that appear whole or not at all.

A run writes each of its outputs under a temporary name in the output's own directory
(`.NAME.partial-XXXXXXXX.EXT`: hidden, same file system, same extension so that the format a
writer picks from the name stays the same), and renames them all into place only when the whole
run completed. On any failure, an interrupt included, the temporaries are removed and the
previous run's files are left as they were:

    with AtomicOutputs() as files:
        write_trace(files.temp(out))
        write_report(files.temp(report))
    # here every output is in place; after an exception none of this run's is

The renames at the end are atomic one by one (POSIX rename), not as a group: an interrupt
between two of them leaves some outputs of the new run beside some of the old.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from types import TracebackType


class AtomicOutputs:
    """The outputs of one run: temporary files now, renamed into place on success."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []  # (temporary, final)

    def temp(self, final: str | os.PathLike[str]) -> Path:
        """A fresh, empty temporary file beside `final`, to be renamed to it on success.

        Raises OSError (as opening `final` would) when the directory cannot take it."""
        target = Path(final)
        for _ in range(100):
            name = f".{target.stem}.partial-{secrets.token_hex(4)}{target.suffix}"
            path = target.with_name(name)
            try:
                # created as open() would create the output itself: mode 0666 less the umask
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                continue
            self._pending.append((path, target))
            return path
        raise FileExistsError(f"no free temporary name beside {target}")

    def commit(self) -> None:
        """Rename every temporary to its final name, in the order they were made."""
        while self._pending:
            path, target = self._pending[0]
            os.replace(path, target)
            self._pending.pop(0)

    def discard(self) -> None:
        """Remove every temporary not yet renamed."""
        while self._pending:
            path, _ = self._pending.pop()
            with contextlib.suppress(FileNotFoundError):  # never made, or already gone
                path.unlink()

    def __enter__(self) -> AtomicOutputs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            try:
                self.commit()
            finally:
                self.discard()  # only left when a rename failed
        else:
            self.discard()
