#!/bin/sh
# The worker of docker-compose.yml (installed in the image as wanps-compose-worker).
#
# Without WANPS_WAN_TRACE it is plain `wanps worker "$@"`. With WANPS_WAN_TRACE=FILE it first
# starts its own emulated WAN link (`wanps linkem`, a shaping TCP proxy on 127.0.0.1) toward
# the server and trains through it: every replica of `docker compose up --scale worker=N` gets
# its own link, and nothing needs NET_ADMIN or netem. The controller stream stays direct (as in
# `wanps demo`). The shipped trace is /opt/wanps/traces/wan-varying.csv.
set -eu
if [ -n "${WANPS_WAN_TRACE:-}" ]; then
    server="${WANPS_SERVER:?WANPS_SERVER must name the server}"
    # The worker waits for the proxy (gRPC wait-for-ready), so no start-up race to handle here.
    # The proxy is a child of the worker's process once exec'd. In a container both end with it;
    # run anywhere else, the proxy must not outlive the worker: setpriv makes the kernel send it
    # SIGTERM when its parent (this shell, then the worker it becomes) ends (PR_SET_PDEATHSIG).
    if command -v setpriv >/dev/null 2>&1; then
        setpriv --pdeathsig TERM -- wanps linkem --listen 127.0.0.1:15051 --target "$server" \
            --trace "$WANPS_WAN_TRACE" &
    else
        wanps linkem --listen 127.0.0.1:15051 --target "$server" --trace "$WANPS_WAN_TRACE" &
    fi
    export WANPS_SERVER=127.0.0.1:15051
fi
exec wanps worker "$@"
