"""``cdcd`` command line: run, check, explain, status, warm, inspect, demo.

Exit codes: 0 success, 1 runtime failure, 2 configuration error (fix the file,
restarting will not help; a supervisor should not crash-loop on it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdcd.config import Config

EXIT_CONFIG = 2


def _err(msg: str) -> None:
    print(f"cdcd: {msg}", file=sys.stderr)


def _load(path: str) -> Config | None:
    """The configuration, or None after printing where and what is wrong (callers exit 2)."""
    from cdcd.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        _err(str(exc))
        return None


def cmd_run(args: argparse.Namespace) -> int:
    from cdcd.daemon import Daemon, HttpBindError
    from cdcd.gcpolicy import tune_for_daemon
    from cdcd.logs import configure
    from cdcd.sources.base import SourceError

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    configure(args.log_format or config.log.format, args.log_level or config.log.level)
    try:
        daemon = Daemon(config)  # refuses settings that cannot work together (daemon.dead_letters: kafka)
    except SourceError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    daemon.install_signal_handlers()
    tune_for_daemon()
    try:
        daemon.run()
    except SourceError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except HttpBindError as exc:  # only a failed bind: Redis and source faults are retried inside run()
        _err(f"cannot serve HTTP on {config.http.host}:{config.http.port}: {exc.strerror} (http.port)")
        return EXIT_CONFIG
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from cdcd.sources.base import SourceError, SourceUnavailable
    from cdcd.sources.settings import PostgresSourceSettings

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    rules = config.rules()
    print(f"{args.config}: OK: {len(rules.by_relation)} table rule(s), prefix {rules.keyspace.prefix!r}, "
          f"channel {rules.keyspace.channel!r}")
    if args.offline or not isinstance(config.source, PostgresSourceSettings):
        return 0
    from cdcd.sources.postgres import PostgresSource

    source = PostgresSource(config.source, rules.source)
    try:
        with source.sql() as conn:
            warnings = source.check_schema(conn)
    except SourceUnavailable as exc:
        _err(f"schema not checked: {exc}")
        return 1
    except SourceError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    for w in warnings:
        print(f"warning: {w}")
    print("live schema: OK")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from cdcd.config import ConfigError, PostgresSourceSettings
    from cdcd.explain import ExplainError, explain

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    # With a Postgres source the database renders the row's values, so the keys are the daemon's.
    source = config.source
    try:
        dsn = source.conninfo() if isinstance(source, PostgresSourceSettings) and not args.offline else None
        out = explain(config.rules(), args.table, args.row, dsn)
    except (ExplainError, ConfigError) as exc:
        _err(str(exc))
        return EXIT_CONFIG
    for note in out.notes:
        _err(note)
    print(json.dumps(out.as_dict(), indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    url = args.url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            status = json.loads(resp.read())
    except (urllib.error.URLError, OSError) as exc:
        _err(f"no daemon answering at {url}: {getattr(exc, 'reason', exc)}")
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0 if status.get("ready") else 1


def format_status(s: dict[str, Any]) -> str:
    lag = s.get("lag") or {}
    pos = s.get("position") or {}
    rows = [
        ("source", s.get("source")),
        ("ready", "yes" if s.get("ready") else "NO: " + "; ".join(s.get("not_ready_because") or [])),
        ("uptime", f"{s.get('uptime_s')} s"),
        ("position", ", ".join(f"{k}={v}" for k, v in pos.items()) or "-"),
        ("applied version", s.get("applied_version")),
        ("changes", f"{s.get('changes')} total, {s.get('rate_10s')}/s (10 s), {s.get('rate_60s')}/s (60 s)"),
        ("batches", s.get("batches")),
        ("last batch", f"{s.get('last_batch_age_s')} s ago" if s.get("last_batch_age_s") is not None else "-"),
        ("lag", ", ".join(f"{k}={v}" for k, v in lag.items()) or "-"),
        ("lag alarm", "YES: slot retains more WAL than the bound" if s.get("lag_alarm") else "no"),
        ("redis / source", f"{'up' if s.get('redis_connected') else 'DOWN'} / "
                           f"{'up' if s.get('source_connected') else 'DOWN'}"),
        ("backplane seq", f"{s.get('backplane_seq')} (run {s.get('run')})"),
        ("last error", f"{s.get('last_error')} ({s.get('last_error_age_s')} s ago)" if s.get("last_error") else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_warm(args: argparse.Namespace) -> int:
    from cdcd.config import ConfigError
    from cdcd.logs import configure
    from cdcd.warm import warm

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    configure(config.log.format, config.log.level)
    try:
        report = warm(config, args.table or None, rate=args.rate)
    except (ValueError, ConfigError) as exc:
        _err(str(exc))
        return EXIT_CONFIG
    for t in report.tables:
        print(f"{t.table}: {t.rows} rows, {t.written} entries written, {t.refused} already newer "
              f"({t.seconds:.1f} s)")
    print(f"snapshot version {report.version}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import psycopg
    import redis

    from cdcd.inspect import EXIT_STALE, InspectError, run_inspect

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        report = run_inspect(config, None if args.all else args.sample, args.all, args.rate, args.threshold,
                             args.settle_timeout, sys.stdout, json_output=args.json, heartbeat=not args.no_heartbeat,
                             clock_margin=args.clock_margin)
    except InspectError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except (psycopg.Error, redis.RedisError) as exc:
        _err(f"inspect failed: {str(exc).strip()}")
        return EXIT_STALE
    return report.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from cdcd.demo import run_demo

    return run_demo(Path(args.config) if args.config else None, Path(args.schema) if args.schema else None,
                    keep_running=args.keep_running)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdcd", description="CDC-driven cache invalidation daemon")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", required=True)
    run.add_argument("--log-format", choices=["auto", "json", "console"])
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(fn=cmd_run)

    check = sub.add_parser("check", help="validate a configuration (and the live schema unless --offline)")
    check.add_argument("config")
    check.add_argument("--offline", action="store_true", help="do not connect to the database")
    check.set_defaults(fn=cmd_check)

    explain = sub.add_parser("explain", help="print the keys and tags a row maps to")
    explain.add_argument("config")
    explain.add_argument("--table", required=True)
    explain.add_argument("--row", required=True, help='JSON object, e.g. \'{"id": 42, "email": "a@b.c"}\'')
    explain.add_argument("--offline", action="store_true",
                         help="render the JSON values as given instead of asking the database how the daemon "
                              "sees them")
    explain.set_defaults(fn=cmd_explain)

    status = sub.add_parser("status", help="position, lag, rates and last error of a running daemon")
    status.add_argument("--url", default="http://127.0.0.1:9108", help="the daemon's http endpoint")
    status.add_argument("--json", action="store_true")
    status.set_defaults(fn=cmd_status)

    warm = sub.add_parser("warm", help="fill Redis for update rules from a consistent snapshot")
    warm.add_argument("--config", "-c", required=True)
    warm.add_argument("--table", action="append", help="only this table (repeatable)")
    warm.add_argument("--rate", type=float, default=10_000, help="rows per second at most (0 = unlimited)")
    warm.set_defaults(fn=cmd_warm)

    demo = sub.add_parser("demo", help="throwaway Postgres + Redis, example rules, the daemon, a few writes")
    demo.add_argument("--config", help="rules file (default ./config/cdcd.example.yaml, else the packaged example)")
    demo.add_argument("--schema", help="schema SQL (default ./config/example-schema.sql, else the packaged one)")
    demo.add_argument("--keep-running", action="store_true", help="keep the daemon and servers up until Ctrl-C")
    demo.set_defaults(fn=cmd_demo)

    inspect = sub.add_parser(
        "inspect", help="check that cached entries agree with the database (read-only, rate-limited)",
        description="Exit codes: 0 consistent, 1 stale ratio above --threshold (or a failure), 2 configuration "
                    "error, 3 inconclusive (candidates did not settle within --settle-timeout).")
    inspect.add_argument("--config", "-c", required=True)
    inspect.add_argument("--sample", type=int, default=1000, help="rows sampled per table (default 1000)")
    inspect.add_argument("--all", action="store_true", help="check every row (paged) and scan the whole keyspace")
    inspect.add_argument("--rate", type=float, default=2000.0,
                         help="rows (and scanned keys) per second at most (0 = unlimited)")
    inspect.add_argument("--threshold", type=float, default=0.0, help="stale/checked ratio tolerated (default 0)")
    inspect.add_argument("--settle-timeout", type=float, default=10.0,
                         help="seconds to wait for the daemon to pass a candidate's position before re-checking")
    inspect.add_argument("--no-heartbeat", action="store_true",
                         help="never emit the empty cdcd message that moves an idle daemon's version forward")
    inspect.add_argument("--clock-margin", type=float, default=0.05,
                         help="seconds of clock uncertainty tolerated when dating application values")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(fn=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> Any:
    args = build_parser().parse_args(argv)
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()
