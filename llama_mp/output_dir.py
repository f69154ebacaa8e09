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

from .errors import LlamaMPError


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
            # Move the old folder aside first: a rename cannot replace a non-empty directory.
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
            os.rename(dst, os.path.join(old, "replaced"))
            os.rename(staging, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, dst)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
