#!/bin/sh
# The worker of the container deployments (installed in the image as wanps-compose-worker):
# docker-compose.yml, docker-stack.yml (Docker Swarm) and k8s/ (Kubernetes) all start it.
#
# Shards: with WANPS_SHARD_ADDRESS (an address with {} for a shard's name ordinal) the worker
# dials WANPS_SHARDS shards, ordinals from WANPS_SHARD_ORDINAL_BASE (default 0) on, in shard
# order: `server-{}:50051`, 3 shards from 1 -> WANPS_SERVER=server-1:50051,server-2:50051,server-3:50051.
# Without it, WANPS_SERVER is used as given (one address, or the list itself).
#
# Emulated WAN: with WANPS_WAN_TRACE=FILE it first starts its own emulated link per shard
# (`wanps linkem`, a shaping TCP proxy on 127.0.0.1:15051, 15052, ...; each follows the trace)
# and trains through them: every replica of `docker compose up --scale worker=N` gets its own
# links, and nothing needs NET_ADMIN or netem. The controller stream stays direct (as in `wanps
# demo`). The shipped trace is /opt/wanps/traces/wan-varying.csv.
set -euf  # -f: no globbing (an address like [::1]:50051 is not a pattern)
me=wanps-compose-worker
MAX_SHARDS=1024  # bounds the loops below; far more shards than any deployment has

whole_number() {  # whole_number NAME VALUE: exits with a usage line unless VALUE is 0, 1, 2, ...
    case "$2" in
        '' | *[!0-9]*) echo "$me: $1 must be a whole number, not '$2'" >&2; exit 2 ;;
    esac
}

if [ -n "${WANPS_SHARD_ADDRESS:-}" ]; then
    shards=${WANPS_SHARDS:-1}
    base=${WANPS_SHARD_ORDINAL_BASE:-0}
    whole_number WANPS_SHARDS "$shards"
    whole_number WANPS_SHARD_ORDINAL_BASE "$base"
    if [ "$shards" -lt 1 ] || [ "$shards" -gt "$MAX_SHARDS" ]; then
        echo "$me: WANPS_SHARDS must be between 1 and $MAX_SHARDS, not $shards" >&2
        exit 2
    fi
    case "$WANPS_SHARD_ADDRESS" in
        *'{}'*) ;;
        *) echo "$me: WANPS_SHARD_ADDRESS must contain {} for the shard's ordinal: '$WANPS_SHARD_ADDRESS'" >&2; exit 2 ;;
    esac
    before=${WANPS_SHARD_ADDRESS%%'{}'*}
    after=${WANPS_SHARD_ADDRESS#*'{}'}
    servers=""
    i=0
    while [ "$i" -lt "$shards" ]; do
        servers="$servers${servers:+,}$before$((base + i))$after"
        i=$((i + 1))
    done
    export WANPS_SERVER="$servers"
fi

if [ -n "${WANPS_WAN_TRACE:-}" ]; then
    servers="${WANPS_SERVER:?WANPS_SERVER (or WANPS_SHARD_ADDRESS) must name the server}"
    # The worker waits for the proxies (gRPC wait-for-ready), so no start-up race to handle here.
    # The proxies are children of the worker's process once exec'd. In a container all end with
    # it; run anywhere else, a proxy must not outlive the worker: setpriv makes the kernel send it
    # SIGTERM when its parent (this shell, then the worker it becomes) ends (PR_SET_PDEATHSIG).
    pdeathsig=""
    if command -v setpriv >/dev/null 2>&1; then
        pdeathsig="setpriv --pdeathsig TERM --"
    fi
    linked=""
    port=15051
    old_ifs=$IFS
    IFS=,
    for server in $servers; do
        IFS=$old_ifs
        if [ "$port" -ge $((15051 + MAX_SHARDS)) ]; then
            echo "$me: more than $MAX_SHARDS servers in WANPS_SERVER" >&2
            exit 2
        fi
        $pdeathsig wanps linkem --listen "127.0.0.1:$port" --target "$server" --trace "$WANPS_WAN_TRACE" &
        linked="$linked${linked:+,}127.0.0.1:$port"
        port=$((port + 1))
    done
    IFS=$old_ifs
    export WANPS_SERVER="$linked"
fi
exec wanps worker "$@"
