"""Range checks for server settings: SettingError naming the setting, its allowed range and the value.

Settings are named as a Ray config file spells them (`max_wait_ms`, `timeout`); the error keeps
the name apart from the reason, so a command line can say `argument --max-wait-ms: must be ...`
instead, and the message points at what the operator typed, whichever way it reached the server.
"""

from __future__ import annotations

from runtime.errors import RequestError


class SettingError(RequestError):
    """One server setting is wrong: `setting` (config-file spelling) and `reason` (the rest)."""

    def __init__(self, setting: str, reason: str):
        super().__init__(f"{setting} {reason}")
        self.setting, self.reason = setting, reason


def int_in(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SettingError(name, f"must be an integer from {low} to {high}; got {value!r:.40}")
    return value


def number_in(name: str, value: object, low: float, high: float, unit: str = "") -> float:
    """A finite number in [low, high] (`not low <= v <= high` also refuses NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise SettingError(name, f"must be a number from {low:g} to {high:g}{unit}; got {value!r:.40}")
    return float(value)


def choice_in(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise SettingError(name, f"must be one of {', '.join(allowed)}; got {value!r:.40}")
    return value
