"""Output: put built documents on disk, atomically, inside the output folder only."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from feeder.exceptions import FeederError

#: What a temp file's name ends with: a whole write (``.tmp``), a streamed image (``.part``).
TEMP_SUFFIXES = (".tmp", ".part")


def temp_path(target: Path, suffix: str) -> Path:
    """The dot-prefixed temp file beside ``target``: never served, swept if left behind."""
    return target.with_name(f".{target.name}{suffix}")


def folder_names(folder: Path) -> list[str]:
    """The names in ``folder``, in no order; none if it does not exist."""
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def remove_temp_files(folder: Path) -> int:
    """Delete every temp file under ``folder``, as a killed write leaves them. How many."""
    removed = 0
    for parent, _folders, names in os.walk(folder):
        for name in names:
            if name.startswith(".") and name.endswith(TEMP_SUFFIXES):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(parent, name))
                    removed += 1
    return removed


def write_atomically(target: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to a dot-prefixed temp file beside ``target``, then rename it.

    Readers, and whatever survives a kill, see the old file or the new one, whole.
    One refresh runs at a time, so the temp file's name needs no random part; one
    left by a killed refresh is removed by the next refresh (see :func:`remove_temp_files`).
    """
    temp = temp_path(target, ".tmp")
    try:
        with open(temp, "wb") as f:
            f.writelines(chunks)
        os.replace(temp, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(e, OSError) and e.filename is None:  # a write: name its file
            e.filename = str(target)
        raise


class OutputFolder:
    """A folder that documents are written into, never outside it."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._prefix = os.path.join(self.root, "")

    def path(self, relative: str) -> Path:
        """The absolute path of ``relative``; refuses anything that escapes the folder.

        A lexical check (no symlink resolution): feeder alone writes this folder, and
        the names it builds are slugs and hex ids. This runs for every file written.
        """
        return Path(self._target(relative))

    def _target(self, relative: str) -> str:
        target = os.path.normpath(os.path.join(self.root, relative))
        # Not the folder itself either (a root of "/" is its own prefix).
        if not target.startswith(self._prefix) or target == str(self.root):
            raise FeederError(f"refusing a path outside {self.root}: {relative!r}")
        return target

    def write(self, relative: str, data: bytes) -> bool:
        """Write ``data`` unless the file already holds exactly it; True if written.

        The bytes go to a temp file beside the target, renamed into place, so a
        reader (or a crash) never sees a half-written file.
        """
        target = self.path(relative)
        try:
            if target.stat().st_size == len(data) and target.read_bytes() == data:
                return False
        except FileNotFoundError:
            pass
        try:
            write_atomically(target, (data,))
        except FileNotFoundError:  # the first file of a new folder
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, (data,))
        return True

    def has_files(self, folder: str, names: Iterable[str]) -> bool:
        """Are all of ``names`` files in ``folder`` ("" for the top)? Every no-op checks them."""
        base = self._target(folder) if folder else self._prefix
        return all(os.path.isfile(os.path.join(base, name)) for name in names)

    def has_folder(self, relative: str) -> bool:
        return os.path.isdir(self._target(relative))

    def remove(self, relative: str) -> bool:
        """Delete a file or folder; True if something was there."""
        target = self.path(relative)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
            return True
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        return True

    def list_folder(self, relative: str) -> list[str]:
        """Names in a sub-folder (empty if it does not exist)."""
        return sorted(folder_names(self.path(relative)))
