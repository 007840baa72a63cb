"""`tensorslice health`: the standard gRPC health check, as a container's HEALTHCHECK runs
it every few seconds. It imports gRPC and the credentials only (no torch), so that it
answers quickly on a busy machine."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorslice.core.credentials import Credentials, resolve_tls, resolve_token

__all__ = ["health_status"]


def health_status(address: str, service: str = "", timeout: float = 5.0) -> str:
    """The status `address` reports for `service` (``SERVING``, ``NOT_SERVING``, ...),
    over TLS where the environment asks for it (``TENSORSLICE_TLS_CA``, ...). Raises
    `grpc.RpcError` when the server cannot be asked."""
    credentials = Credentials(resolve_token(None), resolve_tls(None))
    options = credentials.grpc_options()
    if credentials.tls is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        ca, cert, key = credentials.pem
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert),
                                      options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                              metadata=credentials.metadata)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
