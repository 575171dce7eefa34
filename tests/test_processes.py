"""start_process from a process whose gRPC is busy: children must reach exec (no fork-handler abort)."""
from __future__ import annotations

import threading

import pytest

from wanps.deploy.processes import start_process
from wanps.proto import wanps_pb2 as pb

from conftest import join_threads
from wire import RawClient

SPAWNS = 60


@pytest.mark.timeout(120)
def test_children_start_while_grpc_is_busy_in_this_process(make_cluster, tmp_path):
    """With a preexec_fn (fork instead of vfork) about 1 spawn in 12 aborted here in gRPC's
    restarted epoll poller (grpc/grpc#43055); 60 spawns would catch that almost surely."""
    cluster = make_cluster(policy=None)
    stop = threading.Event()

    def ping() -> None:
        client = RawClient(cluster.server_address)
        try:
            while not stop.is_set():
                client.stub.Ping(pb.PingRequest(), timeout=5)  # an anonymous probe
        finally:
            client.close()

    pingers = [threading.Thread(target=ping) for _ in range(2)]
    for thread in pingers:
        thread.start()
    try:
        codes = []
        for i in range(SPAWNS):
            child = start_process(f"true-{i}", ["true"], tmp_path, wait_for_line=False)
            codes.append(child.wait(30))
            child.stop()
    finally:
        stop.set()
        join_threads(pingers, 10)
    assert codes == [0] * SPAWNS, [(i, code) for i, code in enumerate(codes) if code]
