"""taskorch: a durable task queue that AI assistants share over MCP.

The public in-process API is `open_service`; see the README for a tour.
"""

from .errors import (
    Conflict,
    InternalError,
    InvalidState,
    LeaseLost,
    NotFound,
    PayloadTooLarge,
    StoreBusy,
    TaskorchError,
    ValidationError,
)
from .models import Claim, Lease, Priority, Statistics, Status, Task, TaskEvent, TaskPage, TaskWithEvents
from .service import TaskService, open_service

__version__ = "0.1.0"

__all__ = [
    "Claim",
    "Conflict",
    "InternalError",
    "InvalidState",
    "Lease",
    "LeaseLost",
    "NotFound",
    "PayloadTooLarge",
    "Priority",
    "Statistics",
    "Status",
    "StoreBusy",
    "Task",
    "TaskEvent",
    "TaskPage",
    "TaskService",
    "TaskWithEvents",
    "TaskorchError",
    "ValidationError",
    "__version__",
    "open_service",
]
