"""Cluster token and TLS for every wanps service and client, in one place.

Server side: `ServerSecurity` (from `--token-file`, `--tls-cert`, ... or their environment
variables) gives the gRPC server its TLS credentials and a `TokenAuthInterceptor`, which
refuses every call without the cluster token with UNAUTHENTICATED before the servicer
(or even the request's parser) sees it. gRPC health checks are exempt by default, so
orchestrators can probe liveness without the secret.

Client side: `ClientSecurity` and `aio_channel` / `sync_channel`, the one way every wanps
process dials a service: TLS when configured, and the token sent as call metadata
(`authorization: Bearer TOKEN`) by a client interceptor, so it also works on plaintext
channels (loopback tests, links already inside a VPN), where gRPC forbids call credentials.

Tokens come from a file (one per line; a server accepts every line, a client sends the
first) or from the WANPS_TOKEN environment variable; there is no flag that takes the token
itself, so it never shows in `ps` or shell history. Token files are re-read when they
change, which is how a token is rotated without a restart (docs/security.md).
Nothing here logs, prints or repr()s a token.

The token lets a process in; what binds a member's id to the process that joined as it is
the member secret (wanps.rpc.member_secrets).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import grpc

from wanps.rpc.options import DEFAULT_MAX_MESSAGE_BYTES, grpc_channel_options
from wanps.rpc.config import EnvDefaultsParser

log = logging.getLogger("wanps.auth")

TOKEN_METADATA_KEY = "authorization"
TOKEN_SCHEME = "Bearer "
# gRPC health checking stays open: liveness probes need no secret, and say nothing secret.
DEFAULT_AUTH_EXEMPT: tuple[str, ...] = ("/grpc.health.v1.Health/",)
REFUSAL_MESSAGE = "missing or invalid cluster token"
TOKEN_FILE_RECHECK_S = 1.0
REFUSAL_LOG_INTERVAL_S = 10.0


class SecurityConfigError(ValueError):
    """A token or TLS setting that cannot work. Messages never include a token."""


# ---------------------------------------------------------------------------- tokens


def _check_token(token: str, where: str) -> str:
    # A metadata value: visible ASCII, no spaces. Long random tokens are the point (`openssl rand -hex 32`).
    if not token or not all(33 <= ord(ch) <= 126 for ch in token):
        raise SecurityConfigError(f"{where}: a token must be non-empty printable ASCII without spaces")
    return token


def parse_token_lines(text: str, where: str) -> tuple[str, ...]:
    """Tokens of a token file: one per line; blank lines and `#` comments are ignored."""
    tokens = tuple(_check_token(line.strip(), where) for line in text.splitlines()
                   if line.strip() and not line.strip().startswith("#"))
    if not tokens:
        raise SecurityConfigError(f"{where}: no token in the file")
    return tokens


class TokenSource:
    """The cluster token(s): a fixed value, or a file re-read when it changes.

    A server accepts `tokens()`, a client sends `current()` (the first). A file that becomes
    unreadable or empty mid-rotation keeps the last good tokens (with a warning), so a
    half-written file never locks the cluster out.
    """

    def __init__(self, *, token: str | None = None, path: str | None = None,
                 clock: Callable[[], float] = time.monotonic, recheck_s: float = TOKEN_FILE_RECHECK_S) -> None:
        if (token is None) == (path is None):
            raise SecurityConfigError("a token source needs exactly one of a token or a token file")
        self._path = path
        self._clock = clock
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        if token is not None:
            self._tokens = (_check_token(token, "WANPS_TOKEN"),)
        else:
            self._tokens = ()
            self._reload(strict=True)
        self._digests = self._digest_all(self._tokens)

    @staticmethod
    def _digest_all(tokens: tuple[str, ...]) -> tuple[bytes, ...]:
        return tuple(hashlib.sha256((TOKEN_SCHEME + t).encode()).digest() for t in tokens)

    def _reload(self, strict: bool) -> None:
        assert self._path is not None
        try:
            stat = os.stat(self._path)
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            with open(self._path, encoding="ascii", errors="replace") as f:
                tokens = parse_token_lines(f.read(), f"token file {self._path}")
        except (OSError, SecurityConfigError) as exc:
            if strict:
                raise SecurityConfigError(str(exc) if isinstance(exc, SecurityConfigError)
                                          else f"token file {self._path}: {exc.strerror}") from None
            log.warning("token file %s unusable (%s); keeping the previous token(s)", self._path,
                        exc if isinstance(exc, SecurityConfigError) else exc.strerror)
            return
        if self._stamp is not None:
            log.info("token file %s changed: %d token(s) now", self._path, len(tokens))
        self._stamp, self._tokens = stamp, tokens
        self._digests = self._digest_all(tokens)

    def _refresh(self) -> None:
        if self._path is None:
            return
        now = self._clock()
        if now - self._checked_at < self._recheck_s:
            return
        with self._lock:
            if now - self._checked_at >= self._recheck_s:
                self._checked_at = now
                self._reload(strict=False)

    def tokens(self) -> tuple[str, ...]:
        self._refresh()
        return self._tokens

    def current(self) -> str:
        return self.tokens()[0]

    def accepts(self, presented: str | bytes | None) -> bool:
        """Whether a metadata value carries one of the tokens, in time independent of the token."""
        self._refresh()
        if presented is None:
            return False
        raw = presented.encode("latin-1", "replace") if isinstance(presented, str) else bytes(presented)
        # Fixed-length digests, compared with compare_digest, each against every token: the
        # time taken says nothing about how much of a token was right, or about its length.
        digest = hashlib.sha256(raw).digest()
        matched = False
        for expected in self._digests:
            matched |= hmac.compare_digest(digest, expected)
        return matched

    def __repr__(self) -> str:
        return f"TokenSource(path={self._path!r})" if self._path else "TokenSource(<token>)"


def token_source(token: str | None, token_file: str | None) -> TokenSource | None:
    """The token file wins over a token value; neither: no token."""
    if token_file:
        return TokenSource(path=token_file)
    if token:
        return TokenSource(token=token)
    return None


# ---------------------------------------------------------------------------- server side


def _metadata_value(metadata: Any, key: str) -> str | bytes | None:
    for item in metadata or ():
        name, value = item[0], item[1]
        if name == key:
            return value
    return None


def _refusal_handler(handler: grpc.RpcMethodHandler, on_refused: Callable[[Any], None]) -> grpc.RpcMethodHandler:
    """A handler of the same kind that refuses at once. The request is never parsed."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        on_refused(context)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL_MESSAGE)

    serialize = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, None, serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, None, serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, None, serialize)
    return grpc.stream_stream_rpc_method_handler(refuse, None, serialize)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid cluster token (UNAUTHENTICATED), except exempt methods.

    `exempt` holds full method names or prefixes ending in '/' (a whole service).
    Refusals are logged with the method and the peer, at most once per REFUSAL_LOG_INTERVAL_S
    with a count: a scanner must not be able to flood the log. The token is never logged.
    """

    def __init__(self, source: TokenSource, exempt: Sequence[str] = DEFAULT_AUTH_EXEMPT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._exempt = tuple(exempt)
        self._clock = clock
        self._refused_since_log = 0
        self._last_log = float("-inf")

    def _is_exempt(self, method: str) -> bool:
        return any(method == e or (e.endswith("/") and method.startswith(e)) for e in self._exempt)

    def _note_refusal(self, method: str, context: Any) -> None:
        self._refused_since_log += 1
        now = self._clock()
        if now - self._last_log >= REFUSAL_LOG_INTERVAL_S:
            log.warning("refused %d call(s) without a valid cluster token; latest: %s from %s",
                        self._refused_since_log, method, context.peer())
            self._refused_since_log, self._last_log = 0, now

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if self._is_exempt(method) or self._source.accepts(
                _metadata_value(handler_call_details.invocation_metadata, TOKEN_METADATA_KEY)):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED; nothing to protect
            return None
        return _refusal_handler(handler, lambda context: self._note_refusal(method, context))


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SecurityConfigError(f"{what} {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class ServerSecurity:
    """A service's token and TLS settings. The default: neither (plaintext, open)."""

    token_file: str | None = None
    token: str | None = field(default=None, repr=False)
    tls_cert: str | None = None  # PEM certificate chain of this service
    tls_key: str | None = None  # its PEM private key
    tls_client_ca: str | None = None  # set: mutual TLS, clients need a certificate this CA signed
    auth_exempt: tuple[str, ...] = DEFAULT_AUTH_EXEMPT

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SecurityConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.tls_client_ca and not self.tls_cert:
            raise SecurityConfigError("mutual TLS (--tls-client-ca) needs TLS (--tls-cert, --tls-key)")

    @property
    def has_token(self) -> bool:
        return bool(self.token_file or self.token)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        source = token_source(self.token, self.token_file)
        return [] if source is None else [TokenAuthInterceptor(source, self.auth_exempt)]

    def credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls_cert:
            return None
        assert self.tls_key is not None
        pair = (_read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate"))
        client_ca = _read(self.tls_client_ca, "TLS client CA") if self.tls_client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    def validate(self) -> None:
        """Read the token file and TLS files now, so a bad setting fails at start-up with a clear message."""
        self.interceptors()
        self.credentials()

    def describe(self) -> str:
        """For the start-up log line: what is on, never the token."""
        tls = "off" if not self.tls_cert else ("mutual" if self.tls_client_ca else "on")
        return f"token {'on' if self.has_token else 'off'}, TLS {tls}"


def add_server_security_flags(parser: EnvDefaultsParser) -> None:
    parser.add_argument("--token-file", env="WANPS_TOKEN_FILE", default=None,
                        help="File with the cluster token(s), one per line; callers must send one (re-read on change).")
    parser.add_env_setting("token", "WANPS_TOKEN",
                           "The cluster token itself (environment only; --token-file wins).")
    parser.add_argument("--tls-cert", env="WANPS_TLS_CERT", default=None, help="PEM certificate: serve over TLS.")
    parser.add_argument("--tls-key", env="WANPS_TLS_KEY", default=None, help="PEM private key of --tls-cert.")
    parser.add_argument("--tls-client-ca", env="WANPS_TLS_CLIENT_CA", default=None,
                        help="PEM CA: require client certificates it signed (mutual TLS).")
    parser.add_argument("--auth-exempt", env="WANPS_AUTH_EXEMPT", default=",".join(DEFAULT_AUTH_EXEMPT),
                        help="Comma-separated methods (or 'package.Service/' prefixes) that need no token "
                             "('' = none).")


def server_security_from_args(args: Any) -> ServerSecurity:
    """Raises SecurityConfigError (a ValueError) for settings that cannot work, files included."""
    security = ServerSecurity(token_file=args.token_file or None, token=args.token or None,
                          tls_cert=args.tls_cert or None, tls_key=args.tls_key or None,
                          tls_client_ca=args.tls_client_ca or None,
                          auth_exempt=tuple(m.strip() for m in args.auth_exempt.split(",") if m.strip()))
    security.validate()
    return security


# ---------------------------------------------------------------------------- client side


@dataclass(frozen=True)
class ClientSecurity:
    """How a client dials: token to send, TLS roots and (for mutual TLS) its own certificate."""

    token_file: str | None = None
    token: str | None = field(default=None, repr=False)
    tls: bool = False  # TLS with the system's root CAs (tls_ca implies TLS with that CA instead)
    tls_ca: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    tls_server_name: str | None = None  # check the server's certificate for this name, not the address's host

    def __post_init__(self) -> None:
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise SecurityConfigError("a client certificate needs its key (--tls-client-cert with --tls-client-key)")

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.tls_ca or self.tls_client_cert)

    def token_source(self) -> TokenSource | None:
        return token_source(self.token, self.token_file)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "TLS CA") if self.tls_ca else None,
            private_key=_read(self.tls_client_key, "TLS client key") if self.tls_client_key else None,
            certificate_chain=_read(self.tls_client_cert, "TLS client certificate") if self.tls_client_cert else None,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.tls_server_name)] if self.tls_server_name else []

    @classmethod
    def from_env(cls) -> ClientSecurity:
        """The settings the `wanps` commands would read from the environment (for your own scripts)."""
        parser = EnvDefaultsParser(add_help=False)
        add_client_security_flags(parser)
        return client_security_from_args(parser.parse_args([]))


def add_client_security_flags(parser: EnvDefaultsParser) -> None:
    parser.add_argument("--token-file", env="WANPS_TOKEN_FILE", default=None,
                        help="File with the cluster token (its first line is sent; re-read on change).")
    parser.add_env_setting("token", "WANPS_TOKEN", "The cluster token itself (environment only; --token-file wins).")
    parser.add_argument("--tls", env="WANPS_TLS", action="store_true", help="Dial over TLS, trusting the system CAs.")
    parser.add_argument("--tls-ca", env="WANPS_TLS_CA", default=None,
                        help="PEM CA that signed the services' certificates (implies TLS).")
    parser.add_argument("--tls-client-cert", env="WANPS_TLS_CLIENT_CERT", default=None,
                        help="PEM client certificate, for services that require mutual TLS.")
    parser.add_argument("--tls-client-key", env="WANPS_TLS_CLIENT_KEY", default=None,
                        help="PEM private key of --tls-client-cert.")
    parser.add_argument("--tls-server-name", env="WANPS_TLS_SERVER_NAME", default=None,
                        help="Name to expect in the services' certificates (default: the host dialled).")


def client_security_from_args(args: Any) -> ClientSecurity:
    """Raises SecurityConfigError (a ValueError) for settings that cannot work, files included."""
    security = ClientSecurity(token_file=args.token_file or None, token=args.token or None, tls=bool(args.tls),
                          tls_ca=args.tls_ca or None, tls_client_cert=args.tls_client_cert or None,
                          tls_client_key=args.tls_client_key or None, tls_server_name=args.tls_server_name or None)
    security.token_source()
    security.channel_credentials()
    return security


def client_security_env(security: ClientSecurity) -> dict[str, str]:
    """Environment variables that give a child `wanps` process the same client settings."""
    env = {"WANPS_TOKEN_FILE": security.token_file, "WANPS_TOKEN": security.token,
           "WANPS_TLS": "1" if security.tls else None, "WANPS_TLS_CA": security.tls_ca,
           "WANPS_TLS_CLIENT_CERT": security.tls_client_cert, "WANPS_TLS_CLIENT_KEY": security.tls_client_key,
           "WANPS_TLS_SERVER_NAME": security.tls_server_name}
    return {name: value for name, value in env.items() if value}


def _with_token(metadata: Any, source: TokenSource) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in (metadata or ()) if k != TOKEN_METADATA_KEY]
    return [*kept, (TOKEN_METADATA_KEY, TOKEN_SCHEME + source.current())]


class _AioTokenDetails:
    def __init__(self, source: TokenSource) -> None:
        self._source = source

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(d.method, d.timeout, grpc.aio.Metadata(*_with_token(d.metadata, self._source)),
                                          d.credentials, d.wait_for_ready)


# One class per call type: grpc.aio files an interceptor under the first type it matches only.
class _AioTokenUnaryUnary(_AioTokenDetails, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioTokenUnaryStream(_AioTokenDetails, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioTokenStreamUnary(_AioTokenDetails, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioTokenStreamStream(_AioTokenDetails, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def _aio_token_interceptors(source: TokenSource) -> list[grpc.aio.ClientInterceptor]:
    return [kind(source) for kind in (_AioTokenUnaryUnary, _AioTokenUnaryStream, _AioTokenStreamUnary,
                                      _AioTokenStreamStream)]


class _SyncCallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _SyncTokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                            grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, source: TokenSource) -> None:
        self._source = source

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        details = _SyncCallDetails(d.method, d.timeout, _with_token(d.metadata, self._source), d.credentials,
                                   getattr(d, "wait_for_ready", None), getattr(d, "compression", None))
        return details  # type: ignore[return-value]

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def _options(security: ClientSecurity, max_message_bytes: int, extra: Sequence[tuple[str, Any]]) -> list:
    # Message limits set on purpose on the client too: what a service may send us is bounded.
    return [*grpc_channel_options(max_message_bytes), *extra, *security.channel_options()]


def aio_channel(address: str, security: ClientSecurity | None = None, *,
                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An asyncio channel to a wanps service (call on the loop that will use it)."""
    security = security or ClientSecurity()
    options = _options(security, max_message_bytes, options)
    source = security.token_source()
    interceptors = _aio_token_interceptors(source) if source is not None else None
    credentials = security.channel_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def sync_channel(address: str, security: ClientSecurity | None = None, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking channel to a wanps service (CLIs, scripts, tests)."""
    security = security or ClientSecurity()
    options = _options(security, max_message_bytes, options)
    credentials = security.channel_credentials()
    channel = (grpc.insecure_channel(address, options=options) if credentials is None
               else grpc.secure_channel(address, credentials, options=options))
    source = security.token_source()
    return channel if source is None else grpc.intercept_channel(channel, _SyncTokenInterceptor(source))
