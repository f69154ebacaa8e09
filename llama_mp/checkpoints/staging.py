"""Writing a whole output directory atomically: all of it appears at its final name, or none of it does.

Checkpoint tools write gigabytes over minutes; a crash, a full disk, Ctrl-C or SIGTERM half way must not
leave a folder that looks like a checkpoint but lacks shards. So everything is written into a hidden
staging folder beside the destination (same filesystem, so the final `os.rename` is atomic) and moved
into place only when complete. On any failure the staging folder is deleted and the destination is
untouched.

Two writers aimed at one destination would otherwise both stage and the second rename would silently
replace the first's output. A lock file beside the destination (`.NAME.lock`, created exclusively, holding
the writer's PID) makes writers of one host exclusive; a lock whose process is gone is stale and taken
over. The destination rule is checked again right before the final rename, so that without --overwrite a
folder that appeared meanwhile (made by anything) is never replaced.

The usual ways writing fails become one message each: a folder that cannot be written (permissions, a
read-only filesystem) and a full disk (ENOSPC, or a quota: EDQUOT); an output the caller can size that
the disk cannot hold is refused before anything is written.

A writer killed outright (SIGKILL, a power cut) runs no cleanup. Its staging folder is named after its
host and PID (`.NAME.partial-PID@HOST-XXXX`), so the next writer of that destination, once it holds the
lock, removes what a dead writer of this host left, puts back a previous folder that a killed --overwrite
had moved aside (`.NAME.old-XXXX/replaced`, when NAME is missing), and names anything it cannot attribute.
Single output files (`staged_output_file`) follow the same rules.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Iterator, List, Optional

from ..distributed.failure import process_alive
from ..errors import LlamaMPError

_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# A lock file that exists but holds no PID yet is being written by its owner; one older than this was
# left by a writer that died between creating and filling it.
_EMPTY_LOCK_GRACE_S = 10.0


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


class Terminated(SystemExit):
    """SIGTERM arrived while an output was being written: raised so that the staging folder is removed,
    then ends the command with 143 (128 + SIGTERM), as a shell reports a process stopped by SIGTERM."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def staged_output_dir(dst: str, overwrite: bool = False, src: str = None,
                      needs_bytes: Optional[int] = None) -> Iterator[str]:
    """Yield an empty staging folder; when the block succeeds, it becomes `dst` (replacing it if allowed).

    `needs_bytes`, when the caller can tell, is how big the output will be; a full disk's message says it.
    """
    check_destination(dst, overwrite, src)
    shown = dst
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    with _writable(shown, parent):
        os.makedirs(parent, exist_ok=True)
    require_room(shown, parent, needs_bytes)
    with _sigterm_raises() as sigterm, _exclusive_writer(shown, dst, parent):
        clear_leftovers(dst)
        check_destination(shown, overwrite, src)  # a folder put back by clear_leftovers counts
        staging = None
        try:
            with _writable(shown, parent), _sigterm_held():  # the folder exists only once its name is kept
                staging = tempfile.mkdtemp(prefix=_staging_prefix(dst), dir=parent)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new folder
            yield staging
            check_destination(shown, overwrite, src)  # something may have created it meanwhile
            with _writable(shown, parent):
                if os.path.exists(dst):
                    _replace(staging, dst, parent)
                else:
                    _rename_unless_created(staging, dst, shown)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise _disk_full(shown, parent, staging, needs_bytes, e) from None
            raise
        except BaseException as e:
            # SIGTERM raises Terminated wherever the writer is; inside an import, C code or a library's own
            # handler it may come out as another exception, so the signal itself is what tells.
            if not sigterm.arrived:
                raise
            print(f"llama_mp: stopped by SIGTERM; the unfinished output for {shown} was removed.",
                  file=sys.stderr, flush=True)
            if isinstance(e, Terminated):
                raise
            raise Terminated() from None
        finally:
            if staging is not None and os.path.isdir(staging):
                shutil.rmtree(staging, ignore_errors=True)


def require_room(shown: str, parent: str, needs_bytes: Optional[int]) -> None:
    """Refuse at once an output of `needs_bytes` that the free space of `parent`'s disk cannot hold (a
    little slack: the estimate leaves out headers), rather than fill the disk and fail half way."""
    if not needs_bytes:
        return
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if needs_bytes > free * 1.02 + (1 << 20):
        raise LlamaMPError(f"The output {shown} needs about {_size(needs_bytes)}, but only {_size(free)} are free "
                           f"in {parent}. Free that much space or write to another disk; nothing was written.")


# ----------------------------------------------------------------------------------------------
# What a killed writer leaves behind


def _host() -> str:
    """This host's name as it can sit in a file name."""
    return "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname()) or "host"


def _staging_prefix(dst: str) -> str:
    return f".{os.path.basename(dst)}.partial-{os.getpid()}@{_host()}-"


def _dead_writer(name: str, marker: str) -> Optional[bool]:
    """Whether the leftover `name` (`...{marker}PID@HOST-XXXX`) was left by a process of this host that is
    gone (True), by a live one (False), or cannot be told (None: another host, or an older name)."""
    rest = name.split(marker, 1)[1]
    pid, at, host = rest.partition("-")[0].partition("@")
    if not at or not pid.isdigit() or host != _host():
        return None
    return not process_alive(int(pid))


def clear_leftovers(dst: str) -> List[str]:
    """Sort out what killed writers of `dst` left beside it; the caller holds its lock, so none of it is a
    live writer's. Staging folders or files of dead writers of this host are removed; a previous `dst`
    that a killed --overwrite had moved aside is put back when `dst` is missing (and removed when the new
    one is in place); anything else is named in a note. Returns the notes (also printed on stderr)."""
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    notes = []
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return notes
    for name in names:
        path = os.path.join(parent, name)
        if name.startswith(f".{base}.partial-"):
            dead = _dead_writer(name, ".partial-")
            if dead:
                _remove(path)
                notes.append(f"removed {path}, the unfinished output of a writer that was killed")
            elif dead is None:
                notes.append(f"{path} is the unfinished output of another writer (another host, or an older "
                             "llama_mp) that may have been killed; delete it if no such writer is running")
        elif name.startswith(f".{base}.old-") and os.path.isdir(path):
            aside = os.path.join(path, "replaced")
            if not os.path.lexists(dst) and os.path.isdir(aside):
                os.rename(aside, dst)
                notes.append(f"put the previous {dst} back from {path}: a run with --overwrite was killed "
                             "while replacing it")
            if os.path.lexists(dst):
                _remove(path)
        elif name.startswith(f".{base}.lock.stale-"):  # `_take_over_stale`'s, named PID-THREAD
            pid = name.rsplit(".lock.stale-", 1)[1].split("-")[0]
            if pid.isdigit() and not process_alive(int(pid)):
                _remove(path)
    for note in notes:
        print(f"llama_mp: note: {note}.", file=sys.stderr, flush=True)
    return notes


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _rename_unless_created(staging: str, dst: str, shown: str) -> None:
    """Move `staging` to the free name `dst`. A non-empty folder created there since the check makes the
    rename itself fail (ENOTEMPTY/EEXIST): that is the destination rule, not a crash."""
    try:
        os.rename(staging, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            check_destination(shown, overwrite=False)
        raise


def _disk_full(shown: str, parent: str, staging: Optional[str], needs_bytes: Optional[int], e: OSError) -> LlamaMPError:
    written = _folder_bytes(staging) if staging else 0
    try:
        free = f"; {_size(shutil.disk_usage(parent).free)} are free there now"
    except OSError:
        free = ""
    need = f"The output needs about {_size(needs_bytes)}" if needs_bytes else "The output did not fit"
    return LlamaMPError(f"No space left on device while writing {shown} (in {parent}): {_size(written)} were "
                        f"written before the disk filled. {need}{free}. Free that much space "
                        "or write to another disk; the unfinished output was removed, and the destination "
                        "is as it was.")


def _folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


@contextlib.contextmanager
def _writable(shown: str, parent: str) -> Iterator[None]:
    """Turn a refused write into the folder (permissions, read-only filesystem) into one message."""
    try:
        yield
    except OSError as e:
        if e.errno not in _NOT_WRITABLE:
            raise
        folder = e.filename if isinstance(e.filename, str) and os.path.isdir(e.filename) else parent
        raise LlamaMPError(f"Cannot write the output {shown}: the folder {folder} is not writable "
                           f"({e.strerror}). Choose a destination in a folder you can write to, or ask for "
                           "write permission there; nothing was written.") from None


class _Sigterm:
    arrived = False  # whether SIGTERM came while writing


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[_Sigterm]:
    """While writing, make SIGTERM raise `Terminated` so cleanup runs (its default action would end the
    process at once and leave the staging folder behind), and record that it came. Only the main thread
    can set a handler; the previous handler comes back afterwards, and an ignored SIGTERM stays ignored."""
    seen = _Sigterm()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        yield seen
        return

    def on_sigterm(signum, frame):
        seen.arrived = True
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _sigterm_held() -> Iterator[None]:
    """Hold SIGTERM back (where the OS allows) for a few statements that must not be cut in two, such as
    making the staging folder and keeping its name; one that came meanwhile is delivered afterwards."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


@contextlib.contextmanager
def _exclusive_writer(shown: str, dst: str, parent: str) -> Iterator[None]:
    """Hold `.NAME.lock` beside `dst` while writing it, or fail at once if a live writer holds it."""
    lock = os.path.join(parent, f".{os.path.basename(dst)}.lock")
    with _writable(shown, parent):
        while not _try_lock(lock):
            owner = _lock_owner(lock)
            if owner is not None:
                raise LlamaMPError(f"Another llama_mp command ({owner}) is writing {shown} right now (it "
                                   f"holds {lock}). Wait for it to finish or pick another destination; if no "
                                   f"such process is running, delete {lock}.")
            _take_over_stale(lock)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock)


def _try_lock(lock: str) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    return True


def _lock_owner(lock: str) -> Optional[str]:
    """Who holds `lock` ("PID 1234", or a description when that cannot be told), or None when the lock is
    stale (its process is gone, or it was never filled in) or has vanished."""
    try:
        with open(lock) as f:
            text = f.read().strip()
        age = _age(lock)
    except FileNotFoundError:
        return None
    except OSError as e:  # not a readable file: only a person can sort that out
        return f"unknown: {lock} cannot be read ({e.strerror})"
    if not text.isdigit():
        return "PID not written yet" if age < _EMPTY_LOCK_GRACE_S else None
    if int(text) <= 0:  # 0 and below are process groups, not a writer
        return None
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, owned by another user
        pass
    except OverflowError:  # not a PID any process can have
        return None
    return f"PID {text}"


def _age(path: str) -> float:
    return time.time() - os.path.getmtime(path)


def _take_over_stale(lock: str) -> None:
    """Remove a stale lock so that the next exclusive create can take it. It is first renamed to a name
    of our own, so that of two writers finding it stale only one removes it; if what was moved turns
    out to be a live writer's fresh lock, it is put back."""
    moved = f"{lock}.stale-{os.getpid()}-{threading.get_ident()}"
    try:
        os.rename(lock, moved)
    except FileNotFoundError:
        return
    if _lock_owner(moved) is not None:
        with contextlib.suppress(OSError):
            os.link(moved, lock)  # fails if a third writer took the name: that one holds it then
    with contextlib.suppress(OSError):
        os.remove(moved)


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


# ----------------------------------------------------------------------------------------------
# Single output files (perplexity's --per_token)


def check_output_file(option: str, path) -> str:
    """`path` as a string if a file can be written there, else a LlamaMPError naming `option`: checked
    before the work whose results it will hold (a probe file is made in its folder and removed)."""
    if not isinstance(path, (str, os.PathLike)):
        raise LlamaMPError(f"{option} must be the path of a file to write, got {path!r}.")
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise LlamaMPError(f"{option} {path!r} is a folder; give the name of a file to write; nothing was run.")
    if not os.path.isdir(parent):
        what = "is a file, not a folder" if os.path.exists(parent) else "does not exist"
        raise LlamaMPError(f"{option} {path!r} cannot be written: {parent} {what}. Create the folder first or "
                           "pick a file in an existing one; nothing was run.")
    try:
        fd, probe = tempfile.mkstemp(prefix=_staging_prefix(path), dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise LlamaMPError(f"{option} {path!r} cannot be written: the folder {parent} is not writable "
                           f"({e.strerror}). Pick a file in a folder you can write to; nothing was run.") from None
    return path


@contextlib.contextmanager
def staged_output_file(path: str) -> Iterator[str]:
    """Yield a temporary file name beside `path`; when the block succeeds it replaces `path` at once, so
    `path` is the previous file or the complete new one, never half of it. What a killed writer of
    `path` left is sorted out first (`clear_leftovers`)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    clear_leftovers(path)
    staging = None
    try:
        with _writable(path, parent):
            fd, staging = tempfile.mkstemp(prefix=_staging_prefix(path), dir=parent)
            os.close(fd)
            yield staging
            os.replace(staging, path)
            staging = None
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise _disk_full(path, parent, None, None, e) from None
        raise LlamaMPError(f"Cannot write {path}: {e.strerror or e}. Nothing was written there.") from None
    finally:
        if staging is not None:
            with contextlib.suppress(OSError):
                os.remove(staging)
