"""The outermost mod never lets exception text (paths, tag values) leave the node."""

from __future__ import annotations

from flwr.app import Context, Error, Message, MessageType, RecordDict

from client.mods import ERROR_CODE_NODE, ERROR_CODE_REFUSED, sanitize_errors_mod
from common.errors import BudgetExceededError, DataError
from tests.flower_helpers import incoming, node_context


def _message() -> Message:
    return incoming(RecordDict(), MessageType.TRAIN)


def _context() -> Context:
    return node_context({})


def test_raw_exception_text_is_replaced() -> None:
    secret = "/data/hospital/DOE^JOHN/IM1.dcm PatientBirthDate=19600101"

    def boom(msg: Message, ctx: Context) -> Message:
        raise ValueError(secret)

    reply = sanitize_errors_mod(_message(), _context(), boom)
    assert reply.has_error()
    assert reply.error.code == ERROR_CODE_NODE
    assert "DOE" not in reply.error.reason and "/data" not in reply.error.reason
    assert "ValueError" in reply.error.reason


def test_vesalius_error_uses_its_safe_reason_only() -> None:
    def fail(msg: Message, ctx: Context) -> Message:
        raise DataError("no labels in /srv/site-1/labels.csv")

    reply = sanitize_errors_mod(_message(), _context(), fail)
    assert reply.error.reason == DataError.safe_reason


def test_budget_refusal_gets_refused_code() -> None:
    def refuse(msg: Message, ctx: Context) -> Message:
        raise BudgetExceededError("x", safe_reason="refused: over cap")

    reply = sanitize_errors_mod(_message(), _context(), refuse)
    assert reply.error.code == ERROR_CODE_REFUSED and reply.error.reason == "refused: over cap"


def test_inner_error_reply_reason_is_replaced() -> None:
    def inner(msg: Message, ctx: Context) -> Message:
        return Message(Error(code=6, reason="clip failed for /srv/x"), reply_to=msg)

    reply = sanitize_errors_mod(_message(), _context(), inner)
    assert reply.has_error() and "/srv" not in reply.error.reason and reply.error.code == 6


def test_success_passes_through() -> None:
    def ok(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict(), reply_to=msg)

    reply = sanitize_errors_mod(_message(), _context(), ok)
    assert not reply.has_error()
