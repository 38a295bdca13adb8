"""Reach the coordinator and supervise Flower's SuperNode, saying WHY a connection fails.

Flower's SuperNode retries an unreachable SuperLink forever with ``Connection attempt failed,
retrying in N seconds``, naming neither the address nor the cause. ``vesalius node start``
therefore:

1. probes the SuperLink's Fleet address itself (:func:`probe`: a TCP connect with a timeout,
   then, with TLS, a handshake against the ``--root-certificates`` CA with the host name
   checked), classifies a failure (:class:`LinkProblem`) and retries with exponential back-off
   and a visible attempt count (:func:`wait_for_coordinator`);
2. runs ``flower-supernode`` as a supervised child (:func:`supervise`, with the warm worker
   beside it when there is one: :mod:`cli.node_processes`): SIGINT/SIGTERM are forwarded to
   it, its output is read line by line, Flower's retry lines become the same classified,
   counted sentence (:class:`FlowerOutput`), an authentication refusal is recognised, every
   other line is shown once (through :func:`common.logsafe.redact`) and a traceback of the
   child is reduced to one line;
3. once the node has joined, a dropped connection (a network cut, the SuperLink restarting)
   is one line, ``lost the connection ...; the node reconnects by itself``, and its end
   another, ``reconnected to the coordinator ... after N s``: Flower's SuperNode retries by
   itself with exponential back-off (at most 20 s between tries in flwr 1.42), so nothing is
   restarted and each retry is not shown.

The coordinator's address, which the operator typed, may be shown; file paths never are.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cli.node_processes import ANSI, Child, TracebackFolder, supervise_children
from common.errors import ConnectionProblem
from common.logsafe import redact

Say = Callable[[str], None]
#: Seconds before the second attempt; doubled after each failure up to :data:`MAX_DELAY_S`.
FIRST_DELAY_S = 2.0
MAX_DELAY_S = 60.0
PROBE_TIMEOUT_S = 5.0

_FLOWER_RETRY = re.compile(r"Connection attempt failed, retrying in ([0-9.]+) seconds")
_FLOWER_SUCCESS = re.compile(r"Connection successful after ([0-9.]+) seconds")
_FLOWER_NODE_ID = re.compile(r"SuperNode ID: \d+")
#: Flower lines that say nothing the operator can act on (the warm worker's shared secret is
#: set by ``vesalius node start`` itself).
_FLOWER_QUIET = re.compile(r"SuperExec authentication is experimental")


@dataclass(frozen=True)
class LinkProblem:
    """Why the coordinator cannot be used.

    Attributes
    ----------
    kind : str
        ``"unreachable"``, ``"tls"`` or ``"auth"``.
    cause : str
        Short cause, e.g. ``"connection refused"`` (no path, no value).
    fix : str
        What the operator should check.
    retryable : bool
        Whether waiting may help (a server not up yet) or not (a certificate mismatch).
    """

    kind: str
    cause: str
    fix: str
    retryable: bool

    def sentence(self, address: str, attempt: int | None = None) -> str:
        """``attempt N: cannot reach the coordinator at ADDRESS (cause)``."""
        verb = "was refused by" if self.kind == "auth" else "cannot reach"
        prefix = f"attempt {attempt}: " if attempt is not None else ""
        subject = "this node" if self.kind == "auth" else ""
        head = f"{prefix}{subject} {verb}" if subject else f"{prefix}{verb}"
        return f"{head} the coordinator at {address} ({self.cause})"


def _unreachable(cause: str, fix: str = "check the --superlink address and that the "
                 "coordinator's SuperLink is running and reachable from this host") -> LinkProblem:
    return LinkProblem("unreachable", cause, fix, retryable=True)


_TLS_FIX_CA = ("give the CA certificate that signed the coordinator's certificate with "
               "--root-certificates")
_TLS_FIX_HOST = ("use the host name or IP address the coordinator's certificate was issued for "
                 "in --superlink, or ask for a certificate that names this address")
_TLS_FIX_PLAIN = ("the coordinator serves plain text: ask its operator to enable TLS, or use "
                  "--insecure on a loopback test only")
AUTH_REFUSED = LinkProblem(
    "auth", "authentication refused",
    "ask the coordinator's operator to register this node's public key "
    "(vesalius coordinator register --site NAME --public-key node-key.pub), and give its "
    "private key with --auth-private-key",
    retryable=False,
)

#: Lower-case fragments of error texts (Python's, OpenSSL's, Flower's) and their meaning.
_TEXT_CAUSES: tuple[tuple[tuple[str, ...], LinkProblem], ...] = (
    (("hostname mismatch", "ip address mismatch", "doesn't match", "does not match host"),
     LinkProblem("tls", "TLS: the certificate does not name this host", _TLS_FIX_HOST, False)),
    (("certificate has expired",),
     LinkProblem("tls", "TLS: the coordinator's certificate has expired",
                 "ask the coordinator's operator to renew its certificate", False)),
    (("certificate verify failed", "unable to get local issuer", "self-signed certificate",
      "self signed certificate", "unknown ca", "certificate is not trusted"),
     LinkProblem("tls", "TLS: certificate not trusted", _TLS_FIX_CA, False)),
    (("wrong version number", "record layer failure", "packet length too long",
      "http request", "unexpected eof while reading", "ssl/tls handshake error"),
     LinkProblem("tls", "TLS: the server does not speak TLS", _TLS_FIX_PLAIN, False)),
    (("unauthorized", "unauthenticated", "permission_denied", "permission denied",
      "supernode authentication", "must be registered", "authentication failed",
      "public key already in use", "invalid signature", "failed to activate supernode"),
     AUTH_REFUSED),
    (("connection refused",), _unreachable("connection refused")),
    (("name or service not known", "nodename nor servname", "temporary failure in name",
      "no address associated", "getaddrinfo failed"),
     _unreachable("host name not found", "check the host name in --superlink (DNS)")),
    (("timed out", "timeout"), _unreachable("timed out")),
    (("network is unreachable", "no route to host"), _unreachable("network unreachable")),
    (("connection reset", "server disconnected", "connection closed"),
     _unreachable("connection closed by the server")),
)


def classify_text(text: str) -> LinkProblem | None:
    """Classify an error text (an exception's or a Flower log line); ``None`` if unknown."""
    lowered = text.lower()
    for fragments, problem in _TEXT_CAUSES:
        if any(fragment in lowered for fragment in fragments):
            return problem
    return None


def parse_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[IPv6]:PORT``.

    Raises
    ------
    ValueError
        No port, or a port outside 1..65535.
    """
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:/\[\]]+):(\d{1,5})", address.strip())
    if match is None:
        raise ValueError("give the SuperLink's Fleet address as HOST:PORT (e.g. 10.0.0.5:9092)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError("the --superlink port must be between 1 and 65535")
    return host, port


def _classify_os_error(exc: OSError) -> LinkProblem:
    if isinstance(exc, socket.gaierror):
        return _unreachable("host name not found", "check the host name in --superlink (DNS)")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return _unreachable("timed out")
    if isinstance(exc, ConnectionRefusedError):
        return _unreachable("connection refused")
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return _unreachable("network unreachable")
    return classify_text(str(exc)) or _unreachable("connection failed")


def _tls_problem(exc: Exception) -> LinkProblem:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return classify_text(str(exc.verify_message or "")) or classify_text(str(exc)) or \
            LinkProblem("tls", "TLS: certificate not trusted", _TLS_FIX_CA, False)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return LinkProblem("tls", "TLS: no answer to the TLS handshake", _TLS_FIX_PLAIN, False)
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError)):
        return LinkProblem("tls", "TLS: the server closed the connection during the handshake",
                           _TLS_FIX_PLAIN, False)
    problem = classify_text(str(exc))
    if problem is not None and problem.kind == "tls":
        return problem
    return LinkProblem("tls", "TLS: the handshake failed", _TLS_FIX_PLAIN, False)


def probe(host: str, port: int, *, ca_file: Path | None, timeout: float = PROBE_TIMEOUT_S
          ) -> LinkProblem | None:
    """Try the coordinator once: TCP connect, then (with ``ca_file``) a verified TLS handshake.

    Parameters
    ----------
    host, port : str, int
        The SuperLink's Fleet address.
    ca_file : Path | None
        CA certificate (PEM) to verify the server against, with the host name checked
        (SNI); ``None`` for a plain-text (``--insecure``) connection.
    timeout : float
        Seconds for the connect and for the handshake.

    Returns
    -------
    LinkProblem | None
        ``None`` when the coordinator answered as expected.
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return _classify_os_error(exc)
    with sock:
        if ca_file is None:
            return None
        try:
            context = ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError):
            return LinkProblem("tls", "TLS: the --root-certificates file is not a PEM CA "
                               "certificate", "give the coordinator's CA certificate (PEM)", False)
        try:
            with context.wrap_socket(sock, server_hostname=host.strip("[]")):
                return None
        except (OSError, ssl.SSLError) as exc:
            return _tls_problem(exc)


def wait_for_coordinator(
    address: str,
    *,
    ca_file: Path | None,
    max_attempts: int,
    say: Say,
    sleep: Callable[[float], None] = time.sleep,
    first_delay_s: float = FIRST_DELAY_S,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> int:
    """Probe until the coordinator answers, backing off exponentially with a visible count.

    Parameters
    ----------
    address : str
        ``HOST:PORT`` as the operator gave it (shown in messages).
    ca_file : Path | None
        CA certificate for TLS, ``None`` for plain text.
    max_attempts : int
        Give up after this many attempts; 0 = never.
    say : Callable[[str], None]
        Prints one progress sentence.
    sleep : Callable[[float], None]
        Waits (tests pass a fake).
    first_delay_s, timeout_s : float
        Seconds before the second attempt (doubled each time, at most 60 s) and per probe.

    Returns
    -------
    int
        The attempt that succeeded.

    Raises
    ------
    ConnectionProblem
        A failure waiting cannot fix (TLS), or ``max_attempts`` reached.
    """
    host, port = parse_address(address)
    delay = first_delay_s
    attempt = 0
    while True:
        attempt += 1
        problem = probe(host, port, ca_file=ca_file, timeout=timeout_s)
        if problem is None:
            return attempt
        last = max_attempts > 0 and attempt >= max_attempts
        if not problem.retryable or last:
            raise ConnectionProblem(f"{problem.sentence(address, attempt)}; {problem.fix}",
                                    safe_reason="the coordinator could not be reached")
        say(f"{problem.sentence(address, attempt)}; retrying in {delay:g} s")
        sleep(delay)
        delay = min(delay * 2, MAX_DELAY_S)


class FlowerOutput:
    """Translate the SuperNode's output lines into what the operator should read.

    Parameters
    ----------
    address : str
        The SuperLink address (shown in messages).
    diagnose : Callable[[], LinkProblem | None]
        Called on a Flower retry line to find the cause (a :func:`probe`).
    """

    def __init__(self, address: str, diagnose: Callable[[], LinkProblem | None]) -> None:
        self.address = address
        self.diagnose = diagnose
        self.attempts = 0
        self.problem: LinkProblem | None = None
        self.connected = False
        self.cuts = 0
        self._reconnecting = False
        self._traceback = TracebackFolder()
        self._gave_up = False

    def line(self, raw: str) -> str | None:
        """The text to show for one output line (``None``: show nothing)."""
        text = ANSI.sub("", raw).rstrip()
        folded, kind = self._traceback.fold(text)
        if folded:
            return (f"the SuperNode stopped on an internal error ({kind}); its traceback is not "
                    "shown" if kind else None)
        if not text or _FLOWER_QUIET.search(text):
            return None
        if "Giving up reconnection" in text or "Exit Code:" in text:
            self._gave_up = True
        retry = _FLOWER_RETRY.search(text)
        if retry is not None and self._gave_up:
            return None  # a helper (SuperExec) retrying its local link to the ended SuperNode
        if retry is not None and self.connected:
            return self._dropped()
        if retry is not None:
            self.attempts += 1
            problem = self.diagnose() or _unreachable("the connection dropped")
            self.problem = problem
            return (f"{problem.sentence(self.address, self.attempts)}; "
                    f"retrying in {float(retry.group(1)):.1f} s")
        if _FLOWER_NODE_ID.search(text):
            self.connected = True
        success = _FLOWER_SUCCESS.search(text)
        if success is not None:
            return self._reconnected(float(success.group(1)))
        recognised = classify_text(text)
        if recognised is not None and recognised.kind in ("auth", "tls"):
            self.problem = recognised
            return f"{recognised.sentence(self.address)}; {recognised.fix}"
        if recognised is not None and self.problem is None:
            self.problem = recognised
        return redact(text)

    def _dropped(self) -> str | None:
        """A retry after the node had joined: one line per cut, then quiet until it is back."""
        if self._reconnecting:
            return None
        self._reconnecting = True
        self.cuts += 1
        problem = self.diagnose() or _unreachable("the connection dropped")
        return (f"lost the connection to the coordinator at {self.address} ({problem.cause}); "
                "the node reconnects by itself")

    def _reconnected(self, after_s: float) -> str:
        if self._reconnecting:
            self._reconnecting = False
            return f"reconnected to the coordinator at {self.address} after {after_s:.0f} s"
        self.problem = None
        return f"attempt {self.attempts + 1}: the coordinator at {self.address} answers"


def supervise(
    cmd: list[str],
    env: dict[str, str],
    *,
    output: FlowerOutput,
    say: Say,
    grace_s: float = 5.0,
    helpers: Sequence[Child] = (),
) -> int:
    """Run the SuperNode ``cmd`` (and ``helpers``) as children until it ends or we are stopped.

    The SuperNode runs in its own process group with its helpers (Flower's SuperExec and
    ClientApp processes); other ``helpers`` (the warm worker) run beside it in theirs, and are
    restarted when they end unasked (:func:`cli.node_processes.supervise_children`). A signal to
    this process is forwarded once to every group, and helpers still running when the
    SuperNode itself has ended are stopped.

    Returns
    -------
    int
        The SuperNode's exit status; 0 when it stopped because this process was asked to stop.

    Raises
    ------
    ConnectionProblem
        The SuperNode ended after a recognised connection, TLS or authentication failure.
    """
    code, stopping = supervise_children(Child("the SuperNode", cmd, output), helpers, env,
                                        say=say, grace_s=grace_s)
    if stopping:
        return 0
    if code != 0 and output.problem is not None:
        problem = output.problem
        raise ConnectionProblem(f"{problem.sentence(output.address)}; {problem.fix}",
                                safe_reason="the coordinator could not be reached")
    return code
