"""What every settings model shares: the error an operator must fix, and passwords read from files.

Its own module so the source settings (:mod:`cdcd.sources.settings`) and the rest of the
configuration (:mod:`cdcd.config`) use one definition without importing each other.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr


class ConfigError(Exception):
    """A configuration problem an operator must fix; the message says where and what."""


def read_secret(value: SecretStr | None, path: Path | None) -> str | None:
    """An inline secret, else the stripped content of ``path`` (a Docker/Kubernetes secret file), else None."""
    if value is not None:
        return value.get_secret_value()
    if path is not None:
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
    return None
