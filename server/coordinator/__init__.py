"""The coordinator: rounds, intake, the round strategy, judging updates (copies, spot checks), the books and the
store. Nodes reach it through server.net."""

from server.coordinator.coordinator import Coordinator, JobConfig, JobMismatch, NodeSession, Refusal

__all__ = ["Coordinator", "JobConfig", "JobMismatch", "NodeSession", "Refusal"]
