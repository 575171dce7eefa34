#!/bin/sh
# The parameter server of docker-compose.yml (installed in the image as wanps-compose-server).
#
# WANPS_SHARDS server replicas (compose's deploy.replicas) are the shards of one model. Compose
# gives a replica no index, so each finds its own: the ordinal k of the container name
# WANPS_SHARD_NAME (`<project>-server-{}`) that resolves to it makes it shard k - 1
# (`python -m wanps.deploy.compose_shard`). Then it is `wanps server` with WANPS_SHARD=I/N.
# A WANPS_SHARD set by hand wins. Swarm and Kubernetes need none of this: their shards take
# their index from the host name (WANPS_SHARD=host/N).
set -euf
me=wanps-compose-server
shards=${WANPS_SHARDS:-1}
case "$shards" in
    '' | *[!0-9]* | 0) echo "$me: WANPS_SHARDS must be a whole number >= 1, not '$shards'" >&2; exit 2 ;;
esac
if [ -z "${WANPS_SHARD:-}" ]; then
    if [ "$shards" -eq 1 ]; then
        index=0
    else
        if [ -z "${WANPS_SHARD_NAME:-}" ]; then
            echo "$me: WANPS_SHARD_NAME must name the server replicas when WANPS_SHARDS > 1" >&2
            exit 2
        fi
        index=$(python3 -m wanps.deploy.compose_shard --name "$WANPS_SHARD_NAME" --count "$shards" --first 1)
    fi
    export WANPS_SHARD="$index/$shards"
fi
exec wanps server "$@"
