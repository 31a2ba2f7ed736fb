"""The two families of failure, so every front end answers each the same way.

- `RequestError`: the caller asked for something this bundle or server cannot do (a step count out
  of range, an unknown scheduler, an unreadable prompt). HTTP 4xx, CLI exit 2. The message names
  the parameter and its allowed range, and the caller can fix it by changing the request.
- `SetupError`: the installation, the bundle or the hardware is broken (a damaged file, a missing
  library, an engine without a profile for a valid shape). HTTP 5xx, CLI exit 3. The message names
  the file or component and the command that repairs it; the caller cannot fix it.

`RequestError` stays a `ValueError` (what Python code expects for a bad argument); `SetupError`
is a `RuntimeError`, so `except ValueError` never swallows a broken installation.
"""

from __future__ import annotations

EXIT_REQUEST = 2  # the CLI's exit status for a RequestError (argparse uses 2 as well)
EXIT_SETUP = 3  # ... and for a SetupError


class RequestError(ValueError):
    """Bad input from the caller: 4xx / exit 2."""


class SetupError(RuntimeError):
    """Broken installation, bundle or hardware: 5xx / exit 3."""


def exit_status(exc: RequestError | SetupError) -> int:
    """The CLI exit status of the error's family."""
    return EXIT_REQUEST if isinstance(exc, RequestError) else EXIT_SETUP
