"""Loading the daemon's YAML configuration with errors that point at the line.

A broken file must fail at load with the file, the path inside it and what is
wrong (``cdcd.yaml:14: tables."public.users".keys[1]: template 'user:{id' ...``),
never later at the first change that happens to need the broken rule.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cdcd.rules import Defaults, KeyspaceSettings, Rules, TableRule


class ConfigError(Exception):
    """A configuration problem an operator must fix; the message says where and what."""


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


class RedisSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = "redis://127.0.0.1:6379/0"
    socket_timeout: float = Field(default=5.0, gt=0)
    connect_timeout: float = Field(default=2.0, gt=0)


class LogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class DaemonSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retry_initial: float = Field(default=0.1, gt=0, description="first backoff (s) when Redis or the source fails")
    retry_max: float = Field(default=5.0, gt=0, description="backoff cap (s)")
    dead_letters: Literal["redis", "kafka"] | None = Field(
        default=None, description="where rejected records go (default: kafka for the Kafka source, else redis)")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: PostgresSourceSettings
    redis: RedisSettings = Field(default_factory=RedisSettings)
    keyspace: KeyspaceSettings = Field(default_factory=KeyspaceSettings)
    defaults: Defaults = Field(default_factory=Defaults)
    tables: dict[str, TableRule]
    log: LogSettings = Field(default_factory=LogSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)

    @field_validator("tables")
    @classmethod
    def _tables(cls, v: dict[str, TableRule]) -> dict[str, TableRule]:
        if not v:
            raise ValueError("no tables: the rules map at least one table to keys or tags")
        for name in v:
            if name.count(".") > 1 or not all(name.split(".")):
                raise ValueError(f"{name!r} is not a table name (use table or schema.table)")
        return v

    def rules(self) -> Rules:
        return Rules(self.tables, self.keyspace, self.defaults)


# ------------------------------------------------------------------------------ loading


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            s = str(part)
            if not s.isidentifier():
                s = f'"{s}"'
            out += ("." if out else "") + s
    return out or "(top level)"


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """Follow a pydantic error location through the composed YAML to a 1-based line."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == part:
                    node = v
                    line = k.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def parse_config(text: str, filename: str = "<config>") -> Config:
    try:
        data: Any = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{filename}: expected a mapping at the top level, found {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            line = _line_of(root, loc)
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{filename}:{line}: {_loc(loc)}: {msg}" if line else f"{filename}: {_loc(loc)}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    return parse_config(text, str(p))
