"""A KafkaSource in its own process, for the rebalance test that SIGKILLs a group member.

``python -m tests.kafka.consumer_process BOOTSTRAP TOPIC GROUP ACK_POLLS [CLIENT]``: acknowledges the
first ACK_POLLS non-empty polls, then keeps polling without acknowledging. Prints one JSON
line per poll, ``{"acked": [ids]}`` or ``{"unacked": [ids]}`` (ids = LSN - 1000).
"""

from __future__ import annotations

import json
import sys

from cdcd.change import Transaction
from cdcd.sources.kafka import KafkaSource, KafkaSourceSettings


def main() -> None:
    bootstrap, topic, group, ack_polls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    source = KafkaSource(KafkaSourceSettings(bootstrap_servers=[bootstrap], topics=[topic], group_id=group,
                                             session_timeout_ms=3000, heartbeat_interval_ms=500,
                                             max_poll_records=20,
                                             client=sys.argv[5] if len(sys.argv) > 5 else "kafka-python"))
    source.connect()
    polls = 0
    while True:
        items = source.poll(0.2)
        if not items:
            continue
        polls += 1
        ids = [t.version - 1000 for t in items if isinstance(t, Transaction)]
        if polls <= ack_polls:
            source.ack([t.position for t in items])
            print(json.dumps({"acked": ids}), flush=True)
        else:
            print(json.dumps({"unacked": ids}), flush=True)


if __name__ == "__main__":
    main()
