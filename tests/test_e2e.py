"""End to end: real server, controller, link emulators and workers as processes on loopback.

Checks the invariants the system promises: every replica equals the server's model at
the same version, the final model is the initial model minus the applied means, and bad
pushes to the running server are refused with the right status and change nothing.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from wanps.deploy.processes import start_process, stop_all, wanps_command
from wanps.proto import wanps_pb2 as pb
from wanps.worker import Observer
from wanps.worker.tasks import get_task

from wire import RawClient, models_by_version

ROUNDS = 60


@pytest.mark.timeout(240)
def test_cluster_of_processes_over_emulated_links(tmp_path):
    logs = tmp_path / "logs"
    processes = []
    observer = None
    try:
        server = start_process("server", wanps_command(
            "server", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--min-workers", "2", "--tau-max", "4"),
            logs)
        controller = start_process("controller", wanps_command(
            "controller", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--policy", "static",
            "--tau", "2", "--delta", "0.05"), logs)
        processes += [server, controller]
        server.wait_ready(60)
        controller.wait_ready(60)
        links = [start_process(f"linkem-{i}", wanps_command(
            "linkem", "--listen", "127.0.0.1:0", "--target", server.address, "--bandwidth-mbit", "50",
            "--delay-ms", "10"), logs) for i in range(2)]
        processes += links
        for link in links:
            link.wait_ready(30)

        task = get_task("synthetic")
        observer_model = task.build_model(0)
        replicas = [tmp_path / f"worker-{i}.pt" for i in range(2)]
        workers = [start_process(f"worker-{i}", wanps_command(
            "worker", "--server", links[i].address, "--controller", controller.address, "--task", "synthetic",
            "--lr", "0.2", "--batch-size", "32", "--seed", str(i + 1), "--max-rounds", str(ROUNDS),
            "--save-replica", str(replicas[i])), logs, wait_for_line=False) for i in range(2)]
        processes += workers
        # The observer pulls before round 0 can close (it needs both workers), so it sees every delta.
        observer = Observer(observer_model, server.address, keep_deltas=True, join_timeout_s=60)
        for worker in workers:
            assert worker.wait(180) == 0, worker.tail()
        observer.wait_for_version(ROUNDS, timeout_s=60)
        assert observer.version == ROUNDS

        models = models_by_version(observer)
        assert observer.initial_version == 0
        for path in replicas:
            saved = torch.load(path)
            assert torch.equal(saved["values"], models[saved["version"]]), f"{path} differs from the server's model"

        client = RawClient(server.address)
        try:
            watcher = client.join(num_params=observer.replica.values.numel(),
                                  fingerprint=observer.fingerprint, observer=True)
            version, server_model = client.pull(watcher.worker_id)
            assert version == ROUNDS
            assert torch.equal(server_model, observer.replica.values)
            # Conservation: final = initial - sum of the applied means (in float64, to rounding).
            applied = torch.zeros_like(server_model, dtype=torch.float64)
            for item in observer.replica.applied:
                applied[item.delta.indices.long()] += item.delta.values.double()
            assert torch.allclose(observer.initial_values.double() - applied, server_model.double(), atol=1e-5)
            assert task.accuracy(observer_model) > 0.8

            check_bad_pushes_change_nothing(client, observer)
        finally:
            client.close()
    finally:
        if observer is not None:
            observer.close()
        stop_all(processes)


def check_bad_pushes_change_nothing(client: RawClient, observer: Observer) -> None:
    num_params = observer.replica.values.numel()
    member = client.join(num_params=num_params, fingerprint=observer.fingerprint)
    version, before = client.pull(member.worker_id)
    round_ = member.first_round
    assert round_ == version

    def refused(header_changes: dict, indices: list[int], values: list[float], code: grpc.StatusCode) -> None:
        header = pb.PushHeader(worker_id=member.worker_id, round=round_, computed_at_version=version,
                               codec=pb.CODEC_SPARSE, value_dtype=pb.VALUE_DTYPE_FLOAT32, count=len(indices),
                               member_secret=member.member_secret)
        for name, value in header_changes.items():
            setattr(header, name, value)
        chunk = pb.SparseChunk(indices=np.asarray(indices, "<u4").tobytes(), values=np.asarray(values, "<f4").tobytes())
        with pytest.raises(grpc.RpcError) as error:
            client.push_raw(header, [chunk])
        assert error.value.code() == code, error.value.details()
        now_version, now = client.pull(member.worker_id)
        assert now_version == version and torch.equal(now, before)

    refused({}, [0, num_params], [1.0, 1.0], grpc.StatusCode.INVALID_ARGUMENT)  # out-of-range index
    refused({"count": 3}, [0, 1], [1.0, 1.0], grpc.StatusCode.INVALID_ARGUMENT)  # length mismatch
    refused({}, [0, 1], [1.0, float("nan")], grpc.StatusCode.INVALID_ARGUMENT)  # NaN
    refused({"worker_id": 10**6}, [0], [1.0], grpc.StatusCode.NOT_FOUND)  # unknown worker
    refused({"round": round_ + 50}, [0], [1.0], grpc.StatusCode.FAILED_PRECONDITION)  # outside the window
    after_version, after = client.pull(member.worker_id)
    assert after_version == version and torch.equal(after, before)

    # A valid push closes the round (sole member); its replay is a no-op.
    assert not client.push(member.worker_id, round_, [0], [0.5], computed_at=version).duplicate
    applied_version, applied = client.pull(member.worker_id)
    assert applied_version == version + 1
    assert client.push(member.worker_id, round_, [0], [0.5], computed_at=version).duplicate
    replay_version, replayed = client.pull(member.worker_id)
    assert replay_version == applied_version and torch.equal(replayed, applied)
    expected = before.clone()
    expected[0] -= 0.5
    assert torch.equal(applied, expected)
