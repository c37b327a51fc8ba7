"""Former home of the online pieces, kept only for `cloud/virtual.py`, which imports
`make_trainer` and `rough_sample_count` from here; once it imports them from
`fedpft.edge.task_training`, delete this module."""

from .task_training import make_trainer, rough_sample_count  # noqa: F401
