"""The coordinator: rounds, intake, the round strategy, judging updates (copies, spot checks), the books and the
store. Nodes reach it through server.net."""

from server.coordinator.coordinator import Coordinator
from server.coordinator.intake import NodeSession, Refusal
from server.coordinator.job import JobConfig, JobMismatch

__all__ = ["Coordinator", "JobConfig", "JobMismatch", "NodeSession", "Refusal"]
