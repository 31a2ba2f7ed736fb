"""What the command lines share: argparse types, and one way to report the two error families.

argparse stops here: below the CLIs everything takes typed options (GenerateOptions,
BackendConfig, ServerOptions), never a Namespace.
"""

from __future__ import annotations

import argparse
import logging

from runtime.errors import RequestError, SetupError, exit_status
from runtime.options import parse_size


def size_argument(text: str) -> tuple[int, int]:
    """`parse_size` as an argparse `type=` for --size: argparse prints its message as it is."""
    try:
        return parse_size(text, "--size")
    except RequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """argparse `type=` for counts that must be >= 1 (threads, workers, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {value}")
    return value


def report(log: logging.Logger, exc: RequestError | SetupError) -> int:
    """Log one line (no traceback) and return the exit status of the error's family."""
    log.error("error: %s", exc)
    return exit_status(exc)
