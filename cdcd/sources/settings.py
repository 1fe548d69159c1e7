"""The source settings models (``source:`` in the configuration), side by side.

Only pydantic and the standard library are imported here: loading a configuration never
imports a database or Kafka driver, so a Kafka-only install can read its file and a Postgres
one never pays for kafka-python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from cdcd.secret import read_secret


class PostgresSourceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["postgres"] = "postgres"
    dsn: str = Field(description="libpq connection string or URL of the database whose changes are cached")
    slot: str = Field(default="cdcd", pattern=r"^[a-z0-9_]{1,63}$")
    publication: str = Field(default="cdcd", pattern=r"^[A-Za-z0-9_]{1,63}$")
    create_slot: bool = Field(default=True, description="create the slot when missing (else refuse to start)")
    create_publication: bool = Field(default=True, description="create/extend the publication for the rules' tables")
    status_interval: float = Field(default=1.0, gt=0, description="seconds between standby status updates")
    max_batch: int = Field(default=5000, ge=1, description="changes per Redis pipeline at most")
    max_transaction_changes: int = Field(
        default=20_000, ge=1, description="row changes buffered per transaction; past it the transaction degrades "
                                          "to one table-wide invalidation per table it touched")
    max_transaction_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1, description="pgoutput row bytes buffered per transaction; past it the "
                                                   "transaction degrades like max_transaction_changes")
    password: SecretStr | None = Field(default=None, description="overrides a password in the DSN; never logged")
    password_file: Path | None = Field(default=None, description="file holding the password (Docker/K8s secret)")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    sslrootcert: str | None = Field(default=None, description="CA file for sslmode verify-ca / verify-full")

    def conninfo(self) -> str:
        """The DSN with password and TLS options merged in (libpq keywords; URLs are accepted too)."""
        from psycopg.conninfo import make_conninfo

        extra: dict[str, str] = {}
        secret = read_secret(self.password, self.password_file)
        if secret is not None:
            extra["password"] = secret
        if self.sslmode:
            extra["sslmode"] = self.sslmode
        if self.sslrootcert:
            extra["sslrootcert"] = self.sslrootcert
        return make_conninfo(self.dsn, **extra) if extra else self.dsn
