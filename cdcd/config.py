"""Loading the daemon's YAML configuration with errors that point at the line.

A broken file must fail at load with the file, the path inside it and what is
wrong (``cdcd.yaml:14: tables."public.users".keys[1]: template 'user:{id' ...``),
never later at the first change that happens to need the broken rule.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cdcd.lazycluster import LazyRedisCluster
from cdcd.rules import Defaults, KeyspaceSettings, Rules, TableRule
from cdcd.secret import ConfigError as ConfigError  # re-exported: the error every loader raises
from cdcd.secret import read_secret
from cdcd.sources.settings import KafkaSourceSettings
from cdcd.sources.settings import PostgresSourceSettings as PostgresSourceSettings  # re-exported

ENV_PREFIX = "CDCD_"


class RedisSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(default="redis://127.0.0.1:6379/0", description="redis:// or rediss:// (TLS)")
    socket_timeout: float = Field(default=5.0, gt=0)
    connect_timeout: float = Field(default=2.0, gt=0)
    username: str | None = Field(default=None, description="Redis ACL user")
    password: SecretStr | None = Field(default=None, description="never logged")
    password_file: Path | None = None
    ssl_ca_certs: str | None = Field(default=None, description="CA file for rediss://")
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    cluster: bool = Field(default=False,
                          description="Redis Cluster: url (and urls) are seed nodes (docs/redis-cluster.md)")
    urls: list[str] = Field(default_factory=list, description="more cluster seed nodes, tried after url")
    pubsub: Literal["sharded", "classic"] = Field(
        default="sharded", description="backplane on a cluster: SPUBLISH to the channel's shard, or PUBLISH to all")
    wait_replicas: int = Field(default=0, ge=0, description="cluster: acknowledge a batch only once this many "
                               "replicas of every master hold it (WAIT), so a failover cannot lose it")

    def client(self) -> Any:
        """A redis-py client for these settings (decode_responses off: values are bytes)."""
        return redis_client(self)

    @model_validator(mode="after")
    def _cluster_settings(self) -> RedisSettings:
        if self.urls and not self.cluster:
            raise ValueError("urls lists cluster seed nodes: set cluster: true, or use url alone")
        if self.cluster:
            from redis.connection import parse_url

            for url in (self.url, *self.urls):
                if int(parse_url(url).get("db", 0) or 0) != 0:  # type: ignore[no-untyped-call]
                    raise ValueError(f"{url}: a Redis Cluster has only database 0")
        return self

    def client_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"socket_timeout": self.socket_timeout, "socket_connect_timeout": self.connect_timeout}
        if self.username:
            kw["username"] = self.username
        secret = read_secret(self.password, self.password_file)
        if secret is not None:
            kw["password"] = secret
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name):
                kw[name] = getattr(self, name)
        return kw


def redis_client(settings: RedisSettings) -> Any:
    """``redis.Redis``, or ``redis.cluster.RedisCluster`` seeded from ``url`` and ``urls`` when ``cluster`` is on.

    The cluster client follows MOVED/ASK and refreshes its slot map after a failover with redis-py's own
    policy (its ``Retry``: a few attempts with backoff), so a batch that fails mid-flight raises only after
    those, and the daemon retries the whole batch (writes are versioned: a repeat is harmless).
    """
    import redis

    kw = settings.client_kwargs()
    if not settings.cluster:
        return redis.Redis.from_url(settings.url, health_check_interval=30, **kw)
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.connection import parse_url as _parse
    from redis.retry import Retry

    parse_url: Any = _parse  # untyped in redis-py
    node: Any = ClusterNode

    seeds = []
    for url in settings.urls:
        parsed = parse_url(url)
        seeds.append(node(parsed.get("host", "127.0.0.1"), int(parsed.get("port", 6379))))
    def build() -> Any:
        return RedisCluster.from_url(settings.url, startup_nodes=seeds or None, health_check_interval=30,
                                     retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3), **kw)

    return LazyRedisCluster(build)  # connects on first use: a cluster down at start is retried, not a crash


TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class TargetSettings(RedisSettings):
    """One named Redis target of ``targets:`` (docs/multi-target.md): the Redis settings of ``redis:``
    plus how far this target may fall behind before the daemon stops reading the source."""

    max_pending_changes: int = Field(
        default=100_000, gt=0,
        description="row changes read but not yet applied to this target; at the bound the daemon stops "
                    "reading the source (backpressure) instead of buffering more")


def _bytes(v: Any) -> Any:
    """Accept 1073741824, "1GB", "512MiB", "64 MB"."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", v, re.IGNORECASE)
        if not m:
            raise ValueError(f"{v!r} is not a size (e.g. 512MB, 1GiB)")
        unit = (m.group(2) or "B").upper().replace("I", "")
        return int(float(m.group(1)) * {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}[unit])
    return v


class HttpSettings(BaseModel):
    """Where /metrics, /healthz, /readyz and /status are served (`cdcd status` reads /status)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535, description="0 picks a free port")


class MonitorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interval: float = Field(default=5.0, gt=0, description="seconds between slot / consumer lag checks")
    max_retained_wal: int = Field(default=1024**3, gt=0,
                                  description="warn when the slot keeps more WAL than this (bytes or 1GB)")
    ready_max_lag: int | None = Field(default=256 * 1024**2,
                                      description="not ready while the slot lags more than this (bytes); null = off")
    ready_max_target_lag: float | None = Field(
        default=30.0, gt=0, description="with targets: not ready while a target's oldest unapplied batch was read "
                                        "more than this many seconds ago (the reason names it); null = off")

    _sizes = field_validator("max_retained_wal", "ready_max_lag", mode="before")(_bytes)


class LogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    batch_interval: float = Field(default=1.0, ge=0, description="at most one `batch` line per this many seconds "
                                  "at info, summing the batches in between (0: one line per batch; cdcd.batchlog)")


class DaemonSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retry_initial: float = Field(default=0.1, gt=0, description="first backoff (s) when Redis or the source fails")
    retry_max: float = Field(default=5.0, gt=0, description="backoff cap (s)")
    heartbeat: float = Field(default=1.0, ge=0, description="seconds between empty backplane messages while idle, "
                             "so subscribers notice a lost last message quickly (0 = off)")
    dead_letters: Literal["redis", "kafka"] | None = Field(
        default=None, description="where rejected records go (default: kafka for the Kafka source, else redis)")


def _source_type(v: Any) -> str:
    """``type:`` picks the source; a file without one means postgres."""
    return str(v.get("type", "postgres") if isinstance(v, dict) else getattr(v, "type", "postgres"))


SourceSettings = Annotated[
    Annotated[PostgresSourceSettings, Tag("postgres")] | Annotated[KafkaSourceSettings, Tag("kafka")],
    Discriminator(_source_type),
]


class Config(BaseSettings):
    """The whole configuration. Every field can be overridden from the environment:
    ``CDCD_<SECTION>__<FIELD>`` (e.g. ``CDCD_SOURCE__DSN``, ``CDCD_REDIS__PASSWORD``), which wins over the file.
    """

    model_config = SettingsConfigDict(extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                      nested_model_default_partial_update=True)

    source: SourceSettings
    redis: RedisSettings = Field(default_factory=RedisSettings)
    targets: dict[str, TargetSettings] | None = Field(
        default=None, description="several named Redis targets fed the same stream (docs/multi-target.md); "
                                  "instead of redis:")
    keyspace: KeyspaceSettings = Field(default_factory=KeyspaceSettings)
    defaults: Defaults = Field(default_factory=Defaults)
    tables: dict[str, TableRule]
    log: LogSettings = Field(default_factory=LogSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the environment overrides the YAML file (passed as init data)
        return env_settings, init_settings

    @field_validator("tables")
    @classmethod
    def _tables(cls, v: dict[str, TableRule]) -> dict[str, TableRule]:
        if not v:
            raise ValueError("no tables: the rules map at least one table to keys or tags")
        for name in v:
            if name.count(".") > 1 or not all(name.split(".")):
                raise ValueError(f"{name!r} is not a table name (use table or schema.table)")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: dict[str, TargetSettings] | None) -> dict[str, TargetSettings] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("no targets: name at least one Redis target (or use redis: for a single one)")
        by_url: dict[str, str] = {}
        for name, target in v.items():
            if not TARGET_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a target name (letters, digits, '_', '-', '.'; at most 63, "
                                 "starting with a letter or digit): it labels metrics and log lines")
            other = by_url.get(target.url)
            if other is not None:
                raise ValueError(f"targets {other!r} and {name!r} have the same url {target.url!r}: one Redis "
                                 "would get every write twice and both targets' applied state in one key")
            by_url[target.url] = name
        return v

    @model_validator(mode="after")
    def _one_kind_of_target(self) -> Config:
        if self.targets is not None and "redis" in self.model_fields_set:
            raise ValueError("give either redis: (one target) or targets: (several named ones), not both; "
                             "move the redis: settings under a target name")
        if any(r.replicas for r in self.tables.values()) and any(c in self.keyspace.prefix for c in "{}"):
            raise ValueError("keyspace.prefix: hot-key replicas need a prefix without '{' or '}' (each copy is "
                             "placed on its hash slot by a hash tag of its own)")
        return self

    def target_settings(self) -> dict[str, RedisSettings]:
        """Every Redis target by name: the ``targets:`` mapping, or ``redis:`` as the single target ``redis``."""
        if self.targets is None:
            return {"redis": self.redis}
        return dict(self.targets)

    def redis_for(self, target: str | None) -> RedisSettings:
        """The Redis a one-Redis command (``warm``, ``inspect``) works on: ``redis:``, or the named target."""
        if self.targets is None:
            if target not in (None, "redis"):
                raise ConfigError(f"--target {target}: this configuration has no targets: section (one redis:)")
            return self.redis
        if target is None:
            raise ConfigError(f"this configuration has several Redis targets ({', '.join(self.targets)}): "
                              "name one with --target")
        if target not in self.targets:
            raise ConfigError(f"--target {target}: no such target (targets: {', '.join(self.targets)})")
        return self.targets[target]

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


def postgres_source(config: Config, what: str) -> PostgresSourceSettings:
    """The Postgres settings, for commands that read the database directly (check, warm, inspect)."""
    if not isinstance(config.source, PostgresSourceSettings):
        raise ConfigError(f"{what} reads the database directly and needs source.type postgres (with its dsn)")
    return config.source


def _no_duplicate_targets(root: yaml.Node | None, filename: str) -> None:
    """YAML keeps the last of two equal keys without a word: two targets given one name would silently
    become one, and a cache would stop being fed."""
    if not isinstance(root, yaml.MappingNode):
        return
    for key, value in root.value:
        if key.value != "targets" or not isinstance(value, yaml.MappingNode):
            continue
        seen: dict[str, int] = {}
        for name, _ in value.value:
            line = name.start_mark.line + 1
            if name.value in seen:
                raise ConfigError(f"{filename}:{line}: targets: target {name.value!r} is named twice "
                                  f"(first at line {seen[name.value]})")
            seen[name.value] = line


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
    _no_duplicate_targets(root, filename)
    try:
        config = Config(**data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            line = _line_of(root, loc)
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{filename}:{line}: {_loc(loc)}: {msg}" if line else f"{filename}: {_loc(loc)}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    _no_targets_from_the_environment_alone(config, data, filename)
    return config


def _no_targets_from_the_environment_alone(config: Config, data: dict[str, Any], filename: str) -> None:
    """``CDCD_TARGETS__<NAME>__PASSWORD`` meant for a target of the file but spelled differently (environment
    names are lower-cased and cannot hold ``-`` or ``.``) would add a target of its own, pointing at the
    default Redis; refuse it rather than feed a cache nobody configured."""
    in_file = data.get("targets")
    if config.targets is None or not isinstance(in_file, dict):
        return
    extra = [name for name in config.targets if name not in in_file]
    if extra:
        raise ConfigError(f"{filename}: targets: {', '.join(repr(n) for n in extra)} come only from the environment "
                          f"(CDCD_TARGETS__...); the file's targets are {', '.join(map(str, in_file))}. Environment "
                          "overrides reach only targets whose names are lower case letters, digits and '_'; use "
                          "password_file for the others")


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    return parse_config(text, str(p))
