"""Reading the env file that systemd passes with EnvironmentFile=.

systemd reads the file only when it starts the process, so a SIGHUP reload would see the
old environment. With `--env-file` the daemon re-reads the same file itself on SIGHUP,
with the same syntax: KEY=VALUE lines, `#` and `;` comments, optional quotes.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import ConfigError

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse(text: str, *, source: str = "env file") -> dict[str, str]:
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        key, sep, raw = stripped.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise ConfigError(f"{source}:{number}: expected KEY=VALUE")
        raw = raw.strip()
        try:
            parts = shlex.split(raw, comments=False, posix=True) if raw else [""]
        except ValueError as exc:
            raise ConfigError(f"{source}:{number}: {key}: {exc}") from None
        values[key] = " ".join(parts)
    return values


def overlay(base: Mapping[str, str], path: Path | None) -> dict[str, str]:
    """`base` with the file's values on top, as systemd would have set them."""
    merged = dict(base)
    if path is None:
        return merged
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return merged
    except OSError as exc:
        raise ConfigError(f"--env-file: cannot read {path}: {exc.strerror}") from None
    merged.update(parse(text, source=str(path)))
    return merged


@dataclass(frozen=True)
class Source:
    """Where the settings come from: the environment, with `--env-file` layered over it.

    Kept as it was at start, so that SIGHUP re-reads the same file over the same
    environment.
    """

    environ: Mapping[str, str]
    env_file: Path | None = None

    def read(self) -> dict[str, str]:
        return overlay(self.environ, self.env_file)
