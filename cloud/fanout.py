"""How a round's Task reaches the devices it selects.

One Task on the round topic naming every selected device costs the broker (online devices) x
(names) bytes and every online device a parse of the whole list: quadratic in the fleet. Past a
small selection the cloud addresses the Task instead: each selected device gets its own copy,
naming only it, on its inbox (which it already reads for its receipts). Both forms are the same
Task (same task_id, deadline and blobs); devices accept either, so this is the cloud's choice alone.
"""

from __future__ import annotations

from collections.abc import Iterator

from fedpft.shared import topics
from fedpft.shared.messages import Task

# A round topic Task stays at most this many names (4.2 KB of 64-char ids); above, addressed copies
# cost the broker fewer bytes than the broadcast's (online x names) and every device parses one name.
TASK_BROADCAST_MAX = 64
# The cloud's window of unacknowledged QoS 1 messages (its addressed Tasks, then a receipt per
# update): MQTT's largest, so a round's Tasks never wait on PUBACKs that queue behind the uploads
# on the cloud's one connection. The broker's grant caps it (provision writes max_inflight_messages 0,
# no maximum; Mosquitto's default grants 20). BENCHMARKS.md, scale: with 20 the Tasks of a
# 1,000-device round reached devices 4.5 s later at the median, with 1000 1.8 s.
CLOUD_MAX_INFLIGHT = 65535


def task_deliveries(task: Task) -> Iterator[tuple[str, Task]]:
    """(topic, Task) pairs that carry `task` to each of its devices: the Task itself on the round
    topic for a small selection, else one copy per device, naming only it, on its inbox."""
    if len(task.devices) <= TASK_BROADCAST_MAX:
        yield topics.round_topic(task.run_id), task
        return
    for device in task.devices:
        yield topics.device_topic(task.run_id, device, topics.INBOX), task.model_copy(update={"devices": [device]})
