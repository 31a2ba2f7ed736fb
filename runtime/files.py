"""File helpers shared by export, engines and runtime: content hashes and crash-safe writes.

The crash-safe writes all work the same way: build the new content beside its destination under
a hidden temporary name, then rename it into place, and delete the temporary on any error.
`write_atomic` does it for one file, `write_dir_atomic` for a directory of files that belong
together (a checkpoint, a training state).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hash in 16 MiB chunks: bundle files reach several GB."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes | memoryview | str) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: never half a file."""
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; bundles and engines are shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def write_dir_atomic(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path` to fill; on success it replaces `path` whole.

    An existing `path` is moved aside and deleted only after the new directory is in place, so the
    files are never a mix of old and new. On an error (or Ctrl-C) inside the block the temporary
    directory is deleted and `path` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; bundles are read by other users too
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
