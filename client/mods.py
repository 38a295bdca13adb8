"""Client mods (Flower ``call_next`` middleware) that make the node fail safely.

:func:`sanitize_errors_mod` is the outermost mod of the Vesalius ClientApp. Flower forwards the
text of any exception raised in a ClientApp to the coordinator; that text can hold file paths,
DICOM tag values or patient identifiers. This mod catches every exception, logs it in full on
the node only, and replies with an error carrying :func:`common.errors.safe_reason` instead. It
also replaces the reason of error replies produced by inner mods.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from common import messages as k
from common.errors import BudgetExceededError, VesaliusError, safe_reason

log = logging.getLogger(__name__)

# Error codes of our own, above Flower's (0-8), so operators can tell them apart.
ERROR_CODE_REFUSED = k.ERROR_CODE_REFUSED
ERROR_CODE_NODE = k.ERROR_CODE_NODE


def sanitize_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the rest of the app; turn any exception into an error reply with a safe reason.

    The node keeps serving: the exception never propagates to Flower's runtime.
    """
    try:
        reply = call_next(msg, context)
    except BudgetExceededError as exc:
        log.warning("refused %s message: %s", msg.metadata.message_type, exc)
        return Message(Error(code=ERROR_CODE_REFUSED, reason=safe_reason(exc)), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - the node must never crash on a request
        log.exception("handling a %s message failed", msg.metadata.message_type)
        return Message(Error(code=ERROR_CODE_NODE, reason=safe_reason(exc)), reply_to=msg)
    if reply.has_error() and not _is_ours(reply):
        log.warning("inner error reply replaced by a safe reason: %s", reply.error.reason)
        reason = VesaliusError.safe_reason
        return Message(Error(code=reply.error.code, reason=reason), reply_to=msg)
    return reply


def _is_ours(reply: Message) -> bool:
    return reply.error.code in (ERROR_CODE_REFUSED, ERROR_CODE_NODE)
