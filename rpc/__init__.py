"""What every wanps service needs to serve and to call over gRPC: options, auth, interceptors,
limits, errors and their status codes, the health client. Imports only `wanps.proto`; no torch."""
