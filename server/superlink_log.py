"""Read the SuperLink's output lines and say what matters to a coordinator operator.

Flower 1.42's SuperLink with ``--enable-supernode-auth`` refuses a SuperNode whose key is not
registered with an ``ApiError`` line that quotes the refused key in PEM form (found by
experiment; the SuperNode itself exits with code 305)::

    [/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode with public key:
        b'-----BEGIN PUBLIC KEY-----\\n...', exception: No SuperNode found with the given public key.
    [/v1/fleet/register-node][ApiError:2001] Attempted to register SuperNode with public key: b'...'

(2004: a node signing with a key that is not, or no longer, registered; 2001: a node without
any registered key trying to register itself, e.g. a plain ``flower-supernode`` holding only
the CA certificate). Nobody reads a PEM block, so :class:`SuperLinkOutput` turns these into
``refused a node whose key is not registered: SHA256:<fingerprint>``, the fingerprint
``vesalius node keys`` printed at the hospital, and names the site when the key is one this
coordinator revoked; a hospital that joins or leaves is named by its site. A node whose key is revoked while it is connected gets HTTP 401 on its
next request; uvicorn's access line (which names no key) becomes one sentence too. Other
access lines (every poll of every node) are not shown, except a call of the Control API
(which Flower 1.42 serves unauthenticated on the same port) from another machine, which is a
warning; everything else passes
:func:`common.logsafe.redact`.
"""

from __future__ import annotations

import ast
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from common.logsafe import redact
from server.coordinator_state import NodeRecord, fingerprint_of_pem

__all__ = ["Refusal", "SuperLinkOutput", "parse_refusal"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_API_ERROR = re.compile(
    r"\[(?P<path>/v1/fleet/[\w-]+)\]\[ApiError:(?P<code>\d+)\] Attempted to register SuperNode "
    r"with public key: (?P<key>b'[^']*')")
_ACCESS = re.compile(r'(?P<client>\S+) - "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
_NODE_EVENT = re.compile(r"\[Fleet\.(?P<event>ActivateNode|DeactivateNode)\] "
                         r"(?:Activated|Deactivated) node_id=(?P<node_id>\d+)")
_QUIET = ("ControlServicer.ListNodes", "ControlServicer.ListRuns", "[Fleet.PullMessages]")

#: ApiError codes of a refused SuperNode (``flwr.supercore.error.ApiErrorCode``).
NOT_REGISTERED = 2004
SELF_REGISTRATION = 2001


@dataclass(frozen=True)
class Refusal:
    """A SuperNode the SuperLink refused for its key.

    Attributes
    ----------
    fingerprint : str
        ``SHA256:...`` of the refused public key.
    self_registration : bool
        The node tried to register itself (it holds no registered key at all).
    """

    fingerprint: str
    self_registration: bool


def parse_refusal(line: str) -> Refusal | None:
    """The refusal an ``ApiError`` line of the SuperLink reports, or None for any other line."""
    match = _API_ERROR.search(_ANSI.sub("", line))
    if match is None:
        return None
    try:
        pem = ast.literal_eval(match.group("key"))  # a bytes literal only: never code
    except (ValueError, SyntaxError):
        return None
    found = fingerprint_of_pem(pem) if isinstance(pem, bytes) else None
    if found is None:
        return None
    return Refusal(found, self_registration=int(match.group("code")) == SELF_REGISTRATION)


def refusal_sentence(refusal: Refusal, known: NodeRecord | None) -> str:
    """``refused a node whose key is not registered: SHA256:...`` (+ what is known of the key)."""
    text = f"refused a node whose key is not registered: {refusal.fingerprint}"
    if known is not None and not known.active:
        text += f" (the key of site {known.site}, revoked {known.revoked_at})"
    elif refusal.self_registration:
        text += (" (it tried to register itself: a SuperNode started without "
                 "--auth-private-key, or whose key was never registered)")
    return text


class SuperLinkOutput:
    """Translate the SuperLink's output lines for the operator (same interface as
    :class:`cli.supernode.FlowerOutput`: :meth:`line`, ``problem`` and ``address``).

    Parameters
    ----------
    address : str
        The SuperLink's address (shown in messages).
    lookup : Callable[[str], NodeRecord | None]
        The registry record of a fingerprint (read afresh at each refusal).
    site_of : Callable[[str], NodeRecord | None]
        The registry record of a Flower node id (to name a hospital that joins or leaves).
    """

    def __init__(self, address: str, lookup: Callable[[str], NodeRecord | None],
                 site_of: Callable[[str], NodeRecord | None] = lambda node_id: None) -> None:
        self.address = address
        self.lookup = lookup
        self.site_of = site_of
        self.problem: object | None = None  # never set: the SuperLink has no link problem
        self.refusals: list[Refusal] = []
        self.bind_failed = False
        self._in_traceback = False

    def line(self, raw: str) -> str | None:
        """The text to show for one output line (``None``: show nothing)."""
        text = _ANSI.sub("", raw).rstrip()
        if not text:
            return None
        refusal = parse_refusal(text)
        if refusal is not None:
            self.refusals.append(refusal)
            return refusal_sentence(refusal, self.lookup(refusal.fingerprint))
        if self._in_traceback:
            if text.startswith((" ", "\t")):
                return None
            self._in_traceback = False
        if text.startswith("Traceback (most recent call last)"):
            self._in_traceback = True
            return None
        event = _NODE_EVENT.search(text)
        if event is not None:
            return self._node_event(event.group("event"), event.group("node_id"))
        access = _ACCESS.search(text)
        if access is not None:
            return self._access(access)
        if "address already in use" in text.lower():
            self.bind_failed = True
            return f"the port of {self.address} is already in use by another program"
        if any(marker in text for marker in _QUIET):
            return None
        return redact(text)

    def _node_event(self, event: str, node_id: str) -> str:
        record = self.site_of(node_id)
        who = f"site {record.site}" if record is not None else "a node not registered here"
        what = "joined" if event == "ActivateNode" else "left"
        return f"{who} {what} (node id {node_id})"

    @staticmethod
    def _access(match: re.Match[str]) -> str | None:
        status, path = int(match.group("status")), match.group("path")
        client = match.group("client").rsplit(":", 1)[0].strip("[]")
        if status == 401 and path.startswith("/v1/fleet/"):
            return (f"refused a request from {client} signed by a key that is not registered "
                    "(a node revoked while connected, or a forged identity)")
        if path.startswith("/v1/control/") and not _loopback(client):
            return (f"WARNING: the Control API was called from {client} ({path.rsplit('/', 1)[-1]}"
                    f", HTTP {status}); Flower's Control API has no account authentication, so "
                    "whoever reaches this port can register nodes and submit runs: expose it "
                    "only to the hospitals (firewall, VPN, or a proxy passing /v1/fleet/ only)")
        return None


def _loopback(client: str) -> bool:
    try:
        return ipaddress.ip_address(client).is_loopback
    except ValueError:
        return client == "localhost"
