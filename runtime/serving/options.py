"""Server settings as one frozen value: what both CLIs and the Ray config builder construct.

`python -m runtime.serve` and `python -m runtime.serve_ray` parse their flags into a
`ServerOptions`; `runtime.serve_ray:build_app` builds one from a config file's `args` mapping
(`ServerOptions.from_mapping`); the app, the engine and uvicorn's config take the validated value.
Flat keys are the CLI's long options with underscores (`max_wait_ms`, `no_warmup`), so a config
file and a command line spell a setting the same way, and `validate()` names it that way too.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from runtime.backends.config import BackendConfig
from runtime.bundle import VERIFY_MODES
from runtime.errors import RequestError
from runtime.lora import MAX_CACHE_SIZE, LoraSettings
from runtime.serving.checks import SettingError, choice_in, int_in, number_in
from runtime.serving.engine import EngineConfig
from runtime.serving.limits import Limits

LOG_LEVELS = ("debug", "info", "warning", "error")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # one path segment of /v2/models/{name}


@dataclass(frozen=True)
class ServerOptions:
    bundle: Path = Path("bundles/tiny")
    verify: str = "stamp"  # bundle integrity check at open: one of runtime.bundle.VERIFY_MODES
    backend: BackendConfig = field(default_factory=BackendConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)  # per request, enforced by the app (Ray replicas too)
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token for /v1, /v2 models and /metrics; None: open
    model_name: str = "sdrt"  # the KServe v2 model name
    shutdown_grace_s: float = 30.0  # after SIGTERM: in-flight requests finish, then get a JSON 503
    log_level: str = "info"
    # The listener (uvicorn; Ray's proxy has its own): open connections beyond this are answered
    # 503 and closed at once; an idle keep-alive connection is closed after keep_alive_s.
    max_connections: int = 128
    keep_alive_s: int = 5
    # LoRAs: requests name NAME.safetensors files in this folder (None: LoRAs are refused); the
    # pipeline keeps `lora.cache_size` prepared weight sets (runtime/lora/).
    lora_dir: Path | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> ServerOptions:
        """These options with backend defaults resolved; RequestError naming the setting and its range."""
        if not isinstance(self.bundle, Path):
            raise SettingError("bundle", f"must be a path; got {self.bundle!r:.60}")
        choice_in("verify", self.verify, VERIFY_MODES)
        backend = self.backend.validate()
        engine = self.engine.validate()
        limits = self.limits.validate()
        if not isinstance(self.host, str) or not self.host.strip():
            raise SettingError("host", f"must be a non-empty address; got {self.host!r:.60}")
        int_in("port", self.port, 1, 65535)
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise SettingError("token", "must be a non-empty string (or unset: no authentication)")
        if not isinstance(self.model_name, str) or not _MODEL_NAME.fullmatch(self.model_name):
            raise SettingError(
                "model_name",
                "must be 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit; "
                f"got {self.model_name!r:.60}",
            )
        number_in("shutdown_grace", self.shutdown_grace_s, 0, 3600, " seconds")
        choice_in("log_level", self.log_level, LOG_LEVELS)
        int_in("max_connections", self.max_connections, 1, 65535)
        int_in("keep_alive", self.keep_alive_s, 1, 3600)
        if self.lora_dir is not None and (not isinstance(self.lora_dir, Path) or not self.lora_dir.is_dir()):
            raise SettingError("lora_dir", f"must be an existing folder; got {str(self.lora_dir)!r:.80}")
        int_in("lora_cache", self.lora.cache_size, 1, MAX_CACHE_SIZE)
        return replace(self, backend=backend, engine=engine, limits=limits, lora=self.lora.validate())

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], exclude: Collection[str] = ()) -> ServerOptions:
        """From flat keys (SERVER_KEYS but `exclude`), each type-checked; missing keys keep the defaults.

        Not validated yet: call `validate()`. Unknown keys are refused with the list of allowed ones."""
        allowed = [key for key in SERVER_KEYS if key not in exclude]
        refuse_unknown(values, allowed)
        v = {key: typed(key, value) for key, value in values.items()}
        if "max_wait_ms" in v:  # the flags' units and sense, as the dataclasses keep them
            v["max_wait_s"] = v.pop("max_wait_ms") / 1000
        if "no_warmup" in v:
            v["warmup"] = not v.pop("no_warmup")
        v = {_FIELD_NAMES.get(key, key): value for key, value in v.items()}

        def given(default: Any) -> Any:
            """`default` with the given values of its fields."""
            return replace(default, **{f.name: v[f.name] for f in fields(default) if f.name in v})

        d = cls()  # the flat key `backend` names BackendConfig.backend: the nested configs are set last
        nested = {"backend": d.backend, "engine": d.engine, "limits": d.limits, "lora": d.lora}
        return replace(given(d), **{name: given(default) for name, default in nested.items()})


# Flat keys whose dataclass field is named otherwise (a unit suffix).
_FIELD_NAMES = {
    "timeout": "timeout_s",
    "read_timeout": "read_timeout_s",
    "shutdown_grace": "shutdown_grace_s",
    "keep_alive": "keep_alive_s",
    "lora_cache": "cache_size",
}


# Flat key -> (type, None allowed). The CLIs' flags are these with dashes: --max-wait-ms.
KINDS: dict[str, tuple[type, bool]] = {
    "bundle": (Path, False),
    "verify": (str, False),
    "backend": (str, False),
    "device": (str, True),
    "precision": (str, True),
    "threads": (int, True),
    "static_shapes": (bool, False),
    "workers": (int, False),
    "max_queue": (int, False),
    "max_batch": (int, False),
    "max_wait_ms": (float, False),
    "no_warmup": (bool, False),
    "max_steps": (int, False),
    "max_side": (int, True),
    "max_images": (int, False),
    "max_prompt_chars": (int, False),
    "max_body_bytes": (int, False),
    "timeout": (float, False),
    "read_timeout": (float, False),
    "host": (str, False),
    "port": (int, False),
    "token": (str, True),
    "model_name": (str, False),
    "shutdown_grace": (float, False),
    "log_level": (str, False),
    "max_connections": (int, False),
    "keep_alive": (int, False),
    "lora_dir": (Path, True),
    "lora_cache": (int, False),
}
SERVER_KEYS = tuple(KINDS)
_WHAT = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}


def typed(key: str, value: object, kinds: Mapping[str, tuple[type, bool]] = KINDS) -> Any:
    """`value` if it has the key's type (an int passes as a number, a str as a path), else RequestError."""
    kind, optional = kinds[key]
    if value is None and optional:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if not isinstance(value, bool):  # True is an int to Python, not to a config file
        if kind is int and isinstance(value, int):
            return value
        if kind is float and isinstance(value, (int, float)):
            return float(value)
    if kind is Path and isinstance(value, (str, Path)):
        return Path(value)
    if kind is str and isinstance(value, str):
        return value
    what = _WHAT[kind] + (" or null" if optional else "")
    raise SettingError(key, f"must be {what}; got {value!r:.60}")


def refuse_unknown(
    values: Mapping[str, Any], allowed: Collection[str], hints: Mapping[str, str] | None = None
) -> None:
    """RequestError naming the keys not in `allowed` (with a hint where one is known) and listing those."""
    hints = hints or {}
    unknown = [str(key) for key in values if key not in allowed]
    if unknown:
        why = "; ".join(f"{key}: {hints[key]}" for key in unknown if key in hints)
        raise RequestError(
            f"unknown setting(s) {', '.join(unknown)}{f' ({why})' if why else ''}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
