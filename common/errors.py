"""Error types and the text that may leave a hospital.

Every error a node can raise while serving a message derives from :class:`VesaliusError` and
carries a ``safe_reason``: a fixed, human-readable sentence that names no file path, no DICOM
tag value and no patient data. :func:`safe_reason` maps *any* exception to such a sentence; the
ClientApp's outermost mod uses it so that raw exception text never reaches the coordinator
(Flower forwards ClientApp exception text by default).
"""

from __future__ import annotations


class VesaliusError(Exception):
    """Base class. ``safe_reason`` is text that may leave the hospital."""

    safe_reason: str = "internal error at the node"

    def __init__(self, message: str, *, safe_reason: str | None = None) -> None:
        super().__init__(message)
        if safe_reason is not None:
            self.safe_reason = safe_reason


class ConfigError(VesaliusError):
    """A run or node configuration value is missing or invalid."""

    safe_reason = "invalid configuration"


class DataError(VesaliusError):
    """The node's data cannot be used (no usable files, no labels, too few patients)."""

    safe_reason = "the node's data could not be used"


class BudgetExceededError(VesaliusError):
    """A requested release would exceed the node's privacy budget (epsilon cap)."""

    safe_reason = "refused: the planned privacy spend exceeds this node's epsilon cap"


class PrivacyConfigError(VesaliusError):
    """Privacy parameters are inconsistent (e.g. no noise and no target epsilon)."""

    safe_reason = "invalid privacy parameters"


class ConnectionProblem(VesaliusError):
    """A coordinator or node cannot be reached (address unreachable, TLS, authentication)."""

    safe_reason = "the coordinator could not be reached"


def safe_reason(exc: BaseException) -> str:
    """Return a sentence describing ``exc`` that is safe to send off the node.

    Only the class-level or explicitly provided ``safe_reason`` of a :class:`VesaliusError` is
    used; the exception's own message (which may hold paths or tag values) is never included.
    Any other exception becomes a generic sentence naming only its type.
    """
    if isinstance(exc, VesaliusError):
        return exc.safe_reason
    return f"internal error at the node ({type(exc).__name__}); see the node's local log"
