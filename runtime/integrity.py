"""Every file a run reads is checked against the sha256 the manifest (or a cache's sidecar) vouches for.

Hashing the SD 1.5 files costs seconds, so a file hashed once is remembered in a stamp keyed by its
(size, mtime, ctime, inode): a later open whose stat matches skips the hash; any write, replace or
copy changes the stat and the file is hashed again. The stamp lives beside the bundle
(`.sdrt-verified.json`), or under `~/.cache/sdrt/verified/` when the bundle is read-only.

Modes: `full` hashes every file on every open; `stamp` (default) hashes what the stamp does not
vouch for; `off` trusts the files (a read-only volume whose contents are checked elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from runtime.errors import RequestError, SetupError
from runtime.files import sha256_file, write_atomic

log = logging.getLogger(__name__)

VERIFY_MODES = ("stamp", "full", "off")
STAMP_NAME = ".sdrt-verified.json"
_STAMP_VERSION = 1


class IntegrityError(SetupError):
    """A bundle file differs from the hash that vouches for it."""


def check_verify_mode(mode: str) -> str:
    if mode not in VERIFY_MODES:
        raise RequestError(f"verify must be one of {', '.join(VERIFY_MODES)}; got {mode!r}")
    return mode


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _stamp_path(root: Path) -> Path:
    if os.access(root, os.W_OK):
        return root / STAMP_NAME
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdrt" / "verified"
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return cache / f"{key}.json"


class Verifier:
    """Checks files under one bundle root; thread-safe (backends load models in parallel)."""

    def __init__(self, root: Path, mode: str = "stamp"):
        self.root, self.mode = root, check_verify_mode(mode)
        self._lock = threading.Lock()
        self._stamp_path = _stamp_path(root)
        self._stamp: dict[str, dict[str, object]] = self._read_stamp() if mode == "stamp" else {}
        self._checked: set[tuple[str, str]] = set()  # (path, sha256) already checked by this process
        self.hashed_bytes = 0  # what this process had to hash (for the README's first-open cost)
        self.hash_seconds = 0.0

    def _read_stamp(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self._stamp_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != _STAMP_VERSION:
            return {}
        files = data.get("files")
        return files if isinstance(files, dict) else {}

    def _write_stamp(self) -> None:
        try:
            self._stamp_path.parent.mkdir(parents=True, exist_ok=True)
            # Merge with what another process may have stamped meanwhile.
            merged = {**self._read_stamp(), **self._stamp}
            write_atomic(self._stamp_path, json.dumps({"version": _STAMP_VERSION, "files": merged}))
        except OSError as exc:  # a stamp is an optimisation: without one, the next open hashes again
            log.debug("could not write the verification stamp %s: %s", self._stamp_path, exc)

    def _stamped(self, key: str, path: Path, sha256: str) -> bool:
        entry = self._stamp.get(key)
        return (
            isinstance(entry, dict) and entry.get("sha256") == sha256 and entry.get("id") == _identity(path)
        )

    def matches(self, path: Path, sha256: str) -> bool:
        """Whether `path` hashes to `sha256` (the stamp may vouch for it); never raises for content."""
        if self.mode == "off":
            return path.is_file()
        key = str(path.resolve())
        with self._lock:
            if (key, sha256) in self._checked or self.mode == "stamp" and self._stamped(key, path, sha256):
                self._checked.add((key, sha256))
                return True
        identity = _identity(path)
        start = time.perf_counter()
        actual = sha256_file(path)
        with self._lock:
            self.hashed_bytes += identity[0]
            self.hash_seconds += time.perf_counter() - start
            if actual != sha256:
                return False
            self._checked.add((key, sha256))
            if self.mode == "stamp" and _identity(path) == identity:  # unchanged while hashed
                self._stamp[key] = {"sha256": sha256, "id": identity}
                self._write_stamp()
        return True

    def check(self, path: Path, sha256: str, repair: str) -> None:
        """IntegrityError naming the file and `repair` (the command that fixes it) on a mismatch."""
        try:
            ok = self.matches(path, sha256)
        except FileNotFoundError:
            raise IntegrityError(f"bundle file {path} is missing: {repair}") from None
        except OSError as exc:
            raise IntegrityError(f"bundle file {path} cannot be read ({exc.strerror}): {repair}") from None
        if not ok:
            raise IntegrityError(
                f"bundle file {path} is damaged (its sha256 differs from manifest.json): {repair}"
            )
