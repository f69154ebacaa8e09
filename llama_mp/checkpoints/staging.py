"""Writing a whole output directory atomically: all of it appears at its final name, or none of it does.

Checkpoint tools write gigabytes over minutes; a crash, a full disk or Ctrl-C half way must not leave a
folder that looks like a checkpoint but lacks shards. So everything is written into a hidden staging
folder beside the destination (same filesystem, so the final `os.rename` is atomic) and moved into place
only when complete. On any failure the staging folder is deleted and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from ..errors import LlamaMPError


def check_destination(dst: str, overwrite: bool, src: str = None) -> None:
    """Refuse a destination that is a file, the source itself, or a non-empty folder without --overwrite."""
    if src is not None and os.path.exists(dst) and os.path.samefile(src, dst):
        raise LlamaMPError(f"The destination {dst!r} is the source folder itself. Write to a new folder, "
                           "check it with `llama-mp verify`, then replace the old one yourself.")
    if os.path.isfile(dst):
        raise LlamaMPError(f"The destination {dst!r} is a file; give the name of a folder to create.")
    if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
        raise LlamaMPError(f"The destination {dst!r} already exists and is not empty. Pick a new folder, or "
                           "pass --overwrite to replace it (it is only replaced once the new one is complete).")


@contextlib.contextmanager
def staged_output_dir(dst: str, overwrite: bool = False, src: str = None) -> Iterator[str]:
    """Yield an empty staging folder; when the block succeeds, it becomes `dst` (replacing it if allowed)."""
    check_destination(dst, overwrite, src)
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new folder
    try:
        yield staging
        if os.path.exists(dst):
            _replace(staging, dst, parent)
        else:
            os.rename(staging, dst)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _replace(staging: str, dst: str, parent: str) -> None:
    """Move the old `dst` aside (a rename cannot replace a non-empty folder), move `staging` to `dst`, then
    delete the old one. If the second move fails, the old folder goes back to `dst` before the error."""
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
    aside = os.path.join(old, "replaced")
    try:
        os.rename(dst, aside)
    except BaseException:
        os.rmdir(old)
        raise
    try:
        os.rename(staging, dst)
    except BaseException as e:
        try:
            os.rename(aside, dst)
        except OSError as back:
            raise LlamaMPError(f"Could not move the new output into {dst} ({e}) nor the previous folder back "
                               f"({back}); the previous contents are in {aside}: move that folder to {dst} "
                               "yourself.") from None
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)
