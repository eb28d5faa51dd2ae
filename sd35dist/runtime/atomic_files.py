"""Files and directories that appear complete or not at all (no torch here; the launcher uses it).

A reader — another rank, a resumed job, `sd35dist status` — sees the old content or the new,
never half of it: content goes to a hidden temporary name beside the target, then one
`os.replace`/`os.rename` publishes it (atomic within one file system).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique per process and call, so concurrent writers never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data`, flushed to disk before it becomes visible. The parent must exist."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Replace `path` with `text` (UTF-8), flushed to disk before it becomes visible."""
    write_bytes_atomically(path, text.encode("utf-8"))


def user_umask() -> int:
    """This process's umask, read without setting it (os.umask sets it, racing any writer thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_modes(root: str | os.PathLike[str]) -> None:
    """Give `root` and everything under it the modes a plain open() or mkdir() would: what the user's
    umask allows. Some writers go through a private temporary file (safetensors' save_file leaves
    0600), which on a shared cluster nobody else could read. Symbolic links are left alone."""
    mask = user_umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        # Directories and files the writer made executable (DeepSpeed's zero_to_fp32.py) keep x.
        wanted = (0o777 if path.is_dir() or mode & 0o100 else 0o666) & ~mask
        if mode & 0o777 != wanted:
            os.chmod(path, wanted)


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty directory to fill; on success it is renamed to `final`, on error removed.

    The staging directory and everything in it get the ordinary modes (umask applies; not mkdtemp's
    0700 or a library's 0600 temporary files, which would stick to `final`). Renaming onto an
    existing non-empty `final` raises OSError; an empty one is replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(final)
    staging.mkdir()
    try:
        yield staging
        give_umask_modes(staging)
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def unwritable_reason(target: str | os.PathLike[str]) -> str | None:
    """Why `target` (a file or directory to be created) cannot be written here, or None.

    The nearest existing ancestor must be a directory in which a file can really be created: a probe
    file is made and removed, since permission bits say nothing for root or on a read-only mount."""
    target = Path(target)
    for folder in (target.parent, *target.parent.parents):
        if folder.exists():
            break
    if not folder.is_dir():
        return f"{folder} is a file, not a directory"
    try:
        handle, probe = tempfile.mkstemp(prefix=".sd35dist-probe-", dir=folder)
    except OSError as exc:
        return f"{folder} is not writable ({exc.strerror or exc})"
    os.close(handle)
    os.unlink(probe)
    return None
