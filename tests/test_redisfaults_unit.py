"""Pure logic of cdcd.redisfaults (which errors are retried, which are refusals of one key) and of the
daemon's retry delays."""

from __future__ import annotations

import hiredis
import redis
from redis.backoff import EqualJitterBackoff

from cdcd.daemon import retry_delay
from cdcd.redisfaults import RedisFault, refusal_reason, translate


def test_refusals_are_only_errors_retrying_cannot_fix() -> None:
    rr = redis.ResponseError
    assert refusal_reason(rr("WRONGTYPE Operation against a key holding the wrong kind of value")) == "wrongtype"
    assert refusal_reason(rr("ERR Error running script (call to f_x): @user_script:3: WRONGTYPE ...")) == "wrongtype"
    assert refusal_reason(rr("ERR user_script:5: Script attempted to access nonexistent global")) == "script_error"
    for transient in ("OOM command not allowed when used memory > 'maxmemory'. script: x",
                      "LOADING Redis is loading the dataset in memory", "BUSY Redis is busy running a script",
                      "READONLY You can't write against a read only replica.", "NOSCRIPT No matching script",
                      "ERR something else"):
        assert refusal_reason(rr(transient)) is None, transient
    assert refusal_reason(redis.ConnectionError("reset")) is None
    # redis-py's own classes for transient codes, with the code stripped from the message
    for cls in (redis.exceptions.NoScriptError, redis.exceptions.OutOfMemoryError,
                redis.exceptions.BusyLoadingError, redis.exceptions.ReadOnlyError):
        assert refusal_reason(cls("command not allowed. script: f_x")) is None, cls


def test_every_connection_level_error_becomes_one_retryable_fault() -> None:
    for exc in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(), EOFError(),
                hiredis.ProtocolError("bad"), redis.ConnectionError("x"), redis.TimeoutError("t")):
        fault = translate(exc)
        assert isinstance(fault, RedisFault) and isinstance(fault, redis.RedisError), exc
    reply = redis.ResponseError("OOM")
    assert translate(reply) is reply  # a reply stays a reply: the batch is retried as it is
    bug = KeyError("x")
    assert translate(bug) is bug  # a bug is not a Redis fault


def test_backoff_grows_with_equal_jitter_and_caps() -> None:
    """The daemon's retry delays: redis-py's EqualJitterBackoff, safe after any number of failures."""
    b = EqualJitterBackoff(cap=2.0, base=0.1)
    delays = [retry_delay(b, n) for n in range(2000)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(1.0 <= d <= 2.0 for d in delays[10:])
    assert retry_delay(b, 0) <= 0.1  # a success resets the count
