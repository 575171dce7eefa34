"""`wanps health ADDRESS [--service NAME]`: ask a service's gRPC health service; exit 0 when SERVING.

The container health check of every wanps image (server, controller), and the Kubernetes probe
of a TLS deployment (the kubelet's own gRPC probe speaks plaintext only). It imports only gRPC,
not torch, so a check costs a fraction of a second. It dials as every wanps client does
(wanps.rpc.auth): over TLS with `--tls-ca` (or WANPS_TLS_CA; a client certificate for mutual
TLS), sending the token when one is set (health checks are exempt from it by default).
"""
from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wanps.rpc.auth import ClientSecurity, add_client_security_flags, client_security_from_args, sync_channel
from wanps.rpc.config import EnvDefaultsParser

# Exit codes: 0 SERVING, 1 answered but not SERVING (or the service is unknown there),
# 2 bad usage (argparse), 3 no answer (nothing listening, timeout).
NOT_SERVING, UNREACHABLE = 1, 3


def build_parser() -> EnvDefaultsParser:
    parser = EnvDefaultsParser(prog="wanps health", description="Exit 0 when a gRPC service reports SERVING.")
    parser.add_argument("address", nargs="?", default=None,
                        help="HOST:PORT of the service (default 127.0.0.1:50051, the server) [env WANPS_HEALTH_ADDRESS]")
    parser.add_argument("--service", env="WANPS_HEALTH_SERVICE", default="",
                        help="Service name to check, e.g. wanps.v1.ParameterServer ('' = the whole server).")
    parser.add_argument("--timeout", env="WANPS_HEALTH_TIMEOUT", type=float, default=3.0,
                        help="Seconds to wait for an answer.")
    parser.add_argument("--quiet", action="store_true", help="Print nothing, only set the exit code.")
    add_client_security_flags(parser)
    return parser


def check(address: str, service: str = "", timeout: float = 3.0,
          security: ClientSecurity | None = None) -> tuple[int, str]:
    """(exit code, one line saying why) for the health of `service` at `address`."""
    with sync_channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = NOT_SERVING if exc.code() == grpc.StatusCode.NOT_FOUND else UNREACHABLE
            return code, f"{address} {service or '(server)'}: {exc.code().name} {exc.details() or ''}".rstrip()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    code = 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING
    return code, f"{address} {service or '(server)'}: {status}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    try:
        security = client_security_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    address = args.address or os.environ.get("WANPS_HEALTH_ADDRESS") or "127.0.0.1:50051"
    code, line = check(address, args.service, args.timeout, security)
    if not args.quiet:
        print(line, file=sys.stdout if code == 0 else sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
