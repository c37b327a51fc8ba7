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


def task_deliveries(task: Task) -> Iterator[tuple[str, Task]]:
    """(topic, Task) pairs that carry `task` to each of its devices: the Task itself on the round
    topic for a small selection, else one copy per device, naming only it, on its inbox."""
    if len(task.devices) <= TASK_BROADCAST_MAX:
        yield topics.round_topic(task.run_id), task
        return
    for device in task.devices:
        yield topics.device_topic(task.run_id, device, topics.INBOX), task.model_copy(update={"devices": [device]})
