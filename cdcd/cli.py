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


def _pick_target(config: Config, target: str | None) -> bool:
    """Point ``config.redis`` at the chosen target; False (after saying why) when there is no such target."""
    from cdcd.config import ConfigError

    try:
        config.redis = config.redis_for(target)
    except ConfigError as exc:
        _err(str(exc))
        return False
    return True


def cmd_run(args: argparse.Namespace) -> int:
    from cdcd.daemon import HttpBindError
    from cdcd.gcpolicy import tune_for_daemon
    from cdcd.logs import configure
    from cdcd.multitarget import build_daemon
    from cdcd.sources.base import SourceError

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    configure(args.log_format or config.log.format, args.log_level or config.log.level)
    try:
        daemon = build_daemon(config)  # refuses settings that cannot work together (daemon.dead_letters: kafka)
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

    hot = None
    if args.config:  # the fleet's hot set is in Redis, not in the daemon: read it from there
        hot = _hot_set(args)
        if hot is None:
            return EXIT_CONFIG
    url = args.url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            status = json.loads(resp.read())
    except (urllib.error.URLError, OSError) as exc:
        _err(f"no daemon answering at {url}: {getattr(exc, 'reason', exc)}")
        if hot is None:
            return 1
        status = None
    if args.json:
        out = dict(status or {"daemon": None})
        if hot is not None:
            out["hot_keys"] = hot
        print(json.dumps(out, indent=2))
    else:
        if status is not None:
            print(format_status(status))
        if hot is not None:
            print(format_hot(hot))
    return 0 if status is not None and status.get("ready") else 1


def _hot_set(args: argparse.Namespace) -> dict[str, Any] | None:
    import redis

    from cdcd.hotset import read_fleet

    config = _load(args.config)
    if config is None:
        return None
    try:
        fleet = read_fleet(config.redis.client(), config.rules().keyspace, max_age=args.max_age, top=args.hot)
    except redis.RedisError as exc:
        return {"error": f"cannot read the hot set from Redis: {exc}"}
    return fleet.as_dict()


def format_hot(hot: dict[str, Any]) -> str:
    if "error" in hot:
        return f"hot keys: {hot['error']}"
    keys = hot.get("keys") or []
    lines = [f"hot keys: {len(keys)} from {hot.get('processes')} client process(es) (estimated reads/s, fleet-wide)"]
    lines.extend(f"  {k['score']:>12,.1f}  {k['key']}" for k in keys)
    return "\n".join(lines)


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
    for rel, xf in (s.get("exists_filters") or {}).items():  # docs/existence-filter.md
        fp = xf.get("fp_estimate")
        rows.append((f"exists filter {rel}", "seeded, est. fp " + (f"{fp:.2e}" if fp is not None else "?")
                     if xf.get("seeded") else "not seeded (answers 'maybe')"))
    for name, t in (s.get("targets") or {}).items():  # several Redis targets (docs/multi-target.md)
        slowest = " (slowest)" if name == s.get("slowest_target") and len(s["targets"]) > 1 else ""
        held = ", BACKPRESSURE" if name in (s.get("backpressure") or []) else ""
        rows.append((f"target {name}", f"{'up' if t.get('connected') else 'DOWN'}, applied "
                                       f"{t.get('applied_position')}, {t.get('pending_changes')} changes pending "
                                       f"({t.get('lag_s')} s){slowest}{held}"))
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
    if not _pick_target(config, args.target):
        return EXIT_CONFIG
    if args.hot:
        if args.table:
            _err("--hot warms the fleet's hot keys of every table: drop --table")
            return EXIT_CONFIG
        return _warm_hot(config, args)
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


def _warm_hot(config: Config, args: argparse.Namespace) -> int:
    import psycopg
    import psycopg2
    import redis

    from cdcd.config import ConfigError
    from cdcd.warm_hot import warm_hot

    try:
        r = warm_hot(config, top=args.top, min_score=args.min_score, rate=args.rate, max_age=args.max_age,
                     hot_from=args.hot_from)
    except (ValueError, ConfigError) as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except (psycopg.Error, psycopg2.Error, redis.RedisError) as exc:  # nothing half-done: writes are versioned
        _err(f"warm --hot failed: {str(exc).strip()}")
        return 1
    if args.json:
        print(json.dumps(r.as_dict(), indent=2))
        return 0
    print(f"hot set: {r.hot_keys} keys from {r.processes} client process(es); {r.written} entries written, "
          f"{r.refused} already newer ({r.seconds:.1f} s)")
    for what, keys in (("match no rule", r.unmatched), ("have no row", r.missing_rows),
                       ("not warmable", [f"{k} ({why})" for k, why in r.not_warmable])):
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
            print(f"{len(keys)} key(s) {what}: {shown}")
    print(f"snapshot version {r.version}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import psycopg
    import redis

    from cdcd.inspect import EXIT_STALE, InspectError, run_inspect

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if not _pick_target(config, args.target):
        return EXIT_CONFIG
    if args.watch:
        return _watch(args, config)
    stray = [flag for flag, value in (("--duration", args.duration), ("--min-nines", args.min_nines),
                                      ("--nines-bound", args.nines_bound), ("--metrics-port", args.metrics_port))
             if value is not None]
    if stray:
        _err(f"{', '.join(stray)}: only meaningful with --watch")
        return EXIT_CONFIG
    rate = 2000.0 if args.rate is None else args.rate
    try:
        report = run_inspect(config, None if args.all else args.sample, args.all, rate, args.threshold,
                             args.settle_timeout, sys.stdout, json_output=args.json, heartbeat=not args.no_heartbeat,
                             clock_margin=args.clock_margin)
    except InspectError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except (psycopg.Error, redis.RedisError) as exc:
        _err(f"inspect failed: {str(exc).strip()}")
        return EXIT_STALE
    return report.exit_code


def _bounds(text: str) -> tuple[float, ...]:
    from cdcd.durations import parse_duration

    try:
        bounds = tuple(parse_duration(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not bounds:
        raise argparse.ArgumentTypeError("at least one bound, e.g. 10ms,100ms,1s")
    return bounds


def _duration(text: str) -> float:
    from cdcd.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _watch(args: argparse.Namespace, config: Config) -> int:
    import signal
    import threading

    import psycopg
    import redis

    from cdcd.inspect import EXIT_STALE, InspectError
    from cdcd.inspect.watch import Watcher
    from cdcd.inspect.watchmetrics import WatchMetrics
    from cdcd.logs import configure

    bounds = args.bounds
    try:  # flags first: a mistake is exit 2 before logging is set up or anything is served
        watcher = Watcher(config, bounds=bounds, rate=100.0 if args.rate is None else args.rate, batch=args.batch,
                          settle_timeout=args.settle_timeout, min_nines=args.min_nines,
                          check_bound=args.nines_bound if args.nines_bound is not None else max(bounds),
                          heartbeat=not args.no_heartbeat, clock_margin=args.clock_margin)
    except InspectError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except (psycopg.Error, redis.RedisError) as exc:
        _err(f"inspect --watch failed: {str(exc).strip()}")
        return EXIT_STALE
    configure(config.log.format, config.log.level)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())  # finish the round, print the table, exit
                for sig in (signal.SIGTERM, signal.SIGINT)}
    metrics = None
    try:
        if args.metrics_port is not None:
            metrics = watcher.metrics = WatchMetrics()
            try:
                port = metrics.serve(args.metrics_port, args.metrics_host)
            except OSError as exc:
                _err(f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {exc.strerror or exc}")
                return EXIT_CONFIG
            print(f"metrics on http://{args.metrics_host}:{port}/metrics", file=sys.stderr)
        report = watcher.run(args.duration, stop, args.log_interval)
    except InspectError as exc:  # the rules do not match the database schema
        _err(str(exc))
        return EXIT_CONFIG
    except (psycopg.Error, redis.RedisError) as exc:  # at start; errors during the watch are retried
        _err(f"inspect --watch failed: {str(exc).strip()}")
        return EXIT_STALE
    finally:
        watcher.close()
        if metrics is not None:
            metrics.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    report.write(sys.stdout, args.json)
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
    status.add_argument("--config", "-c", help="also show the fleet's hot keys, read from this config's Redis")
    status.add_argument("--hot", type=int, default=20, help="with --config: how many hot keys (default 20)")
    status.add_argument("--max-age", type=float, default=300.0,
                        help="with --config: ignore client processes that have not published for this many seconds")
    status.set_defaults(fn=cmd_status)

    warm = sub.add_parser("warm", help="fill Redis for update rules from a consistent snapshot")
    warm.add_argument("--config", "-c", required=True)
    warm.add_argument("--table", action="append", help="only this table (repeatable)")
    warm.add_argument("--rate", type=float, default=10_000,
                      help="rows (with --hot: keys) per second at most (0 = unlimited)")
    warm.add_argument("--hot", action="store_true",
                      help="only the keys clients report as hot (CacheOptions.hot_keys; docs/hot-keys.md)")
    warm.add_argument("--top", type=int, default=1000, help="with --hot: the N hottest keys of the fleet")
    warm.add_argument("--min-score", type=float, default=0.0,
                      help="with --hot: only keys read at least this often (estimated reads/s, fleet-wide)")
    warm.add_argument("--max-age", type=float, default=300.0,
                      help="with --hot: ignore client processes that have not published for this many seconds")
    warm.add_argument("--hot-from", metavar="REDIS_URL",
                      help="with --hot: read the hot set from this Redis (the one clients publish to, e.g. the old "
                           "one before traffic moves) and fill the configuration's Redis")
    warm.add_argument("--json", action="store_true", help="with --hot: print the report as JSON")
    warm.add_argument("--target", help="with targets: the target to warm (with --hot: to fill)")
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
    inspect.add_argument("--rate", type=float, default=None,
                         help="rows (and scanned keys) per second at most (0 = unlimited; default 2000, "
                              "100 with --watch)")
    inspect.add_argument("--threshold", type=float, default=0.0, help="stale/checked ratio tolerated (default 0)")
    inspect.add_argument("--settle-timeout", type=float, default=10.0,
                         help="seconds to wait for the daemon to pass a candidate's position before re-checking")
    inspect.add_argument("--no-heartbeat", action="store_true",
                         help="never emit the empty cdcd message that moves an idle daemon's version forward")
    inspect.add_argument("--clock-margin", type=float, default=0.05,
                         help="seconds of clock uncertainty tolerated when dating application values")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--target", help="with targets: in the configuration, the target to inspect")
    watch = inspect.add_argument_group(
        "--watch", "sample reads continuously and report consistency in nines within time bounds "
                   "(docs/consistency-nines.md); exit 1 when below --min-nines at --nines-bound, 3 without reads")
    watch.add_argument("--watch", action="store_true", help="sample continuously instead of one pass")
    watch.add_argument("--bounds", type=_bounds, default=(0.01, 0.1, 1.0),
                       help="staleness bounds, comma-separated durations (default 10ms,100ms,1s)")
    watch.add_argument("--duration", type=_duration, default=None,
                       help="stop after this long (e.g. 60, 5m) and print the final table (default: until SIGTERM)")
    watch.add_argument("--batch", type=int, default=100, help="rows sampled per round (default 100)")
    watch.add_argument("--min-nines", type=float, default=None,
                       help="exit 1 when the nines at --nines-bound are below this (default: any stale read "
                            "beyond the bound fails)")
    watch.add_argument("--nines-bound", type=_duration, default=None,
                       help="the bound --min-nines is checked at; one of --bounds (default the largest)")
    watch.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    watch.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)")
    watch.add_argument("--log-interval", type=_duration, default=10.0,
                       help="seconds between 'watch' log lines (default 10)")
    inspect.set_defaults(fn=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> Any:
    args = build_parser().parse_args(argv)
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()
