"""The sink's slot rule and its multi-key calls against a real cluster: ``apply_many`` over hash-tagged keys
lands on the slot's master in one call (a CROSSSLOT error otherwise), answered per entry."""

from __future__ import annotations

from redis.cluster import RedisCluster

from cdcd.backplane import Sequencer
from cdcd.devservers import RedisClusterServer
from cdcd.rules import Batch, Write
from cdcd.sinks.redis import RedisSink, key_slot, slot_tag
from tests.helpers import config_dict, entry, make_config, unique


def test_key_slot_matches_the_cluster(rc: RedisCluster) -> None:
    keys = [b"123456789", b"v1:user:42", b"v1:{t7}:user:1", b"foo{}{bar}", b"foo{{bar}}zap", b"{a}{b}", b"{{}}",
            b"a{b", "v1:user:\u00e9".encode(), b"p:#tag:tenant:7", b"p:#cdcd:bp"]
    for k in keys:
        assert key_slot(k) == int(rc.execute_command("CLUSTER KEYSLOT", k)), k  # type: ignore[no-untyped-call]
    for slot in (0, 1, 5460, 5461, 12739, 16383):  # the WAIT markers' hash tags (wait_replicas)
        marker = f"p:#cdcd:wait:{{{slot_tag(slot)}}}".encode()
        assert int(rc.execute_command("CLUSTER KEYSLOT", marker)) == slot  # type: ignore[no-untyped-call]


def test_apply_many_on_cluster_one_call_per_slot(redis_cluster: RedisClusterServer, rc: RedisCluster) -> None:
    prefix = unique("g") + ":"
    rules = make_config(config_dict("postgresql://unused/none", redis_cluster.url, "unused", prefix)).rules()
    sink = RedisSink(rc, rules, Sequencer("cdcd"))
    sink.prepare()
    batch = Batch()
    tags = ["t1", "t2", "t3", "t4"]
    for i in range(40):  # ten entries per hash tag, the tags' slots on different masters
        batch.put(Write(sink.ks.entry(f"{{{tags[i % 4]}}}:user:{i}"), 100, b'{"i":%d}' % i, 60_000))
    batch.put(Write(sink.ks.entry("plain:1"), 100, b"p", 60_000))
    batch.version = 100
    owners = {redis_cluster.port_of_slot(key_slot(sink.ks.entry(f"{{{t}}}:x").encode())) for t in tags}
    assert len(owners) >= 2
    result = sink.apply(batch)
    assert result.applied == 41 and result.refused == 0 and not result.refusals
    assert entry(rc, sink.ks.entry("{t3}:user:2"))["d"] == '{"i":2}'
    again = sink.apply(batch)  # a repeat (a retried batch): every entry refused as not newer
    assert again.applied == 0 and again.refused == 41
