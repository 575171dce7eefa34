"""`wanps bench checksum`: the model checksum (proto/checksum.py) against zlib's CRC-32.

For each size d, one random float32 model: the median wall time of `model_checksum` over
`--repeats` calls (after one untimed warm-up) on the CPU, and of `zlib.crc32` over the same
bytes (what replicas compared before the checksum). With `--device cuda`, the checksum is
also timed on the GPU (synchronized), where the CRC would first need the whole model copied
to the host: that copy is timed too.
"""
from __future__ import annotations

import statistics
import time
import zlib
from collections.abc import Callable, Sequence

import torch

from wanps.bench.report import load_summary, machine_info, text_table, write_json
from wanps.proto.checksum import model_checksum
from wanps.rpc.config import EnvDefaultsParser, int_at_least

DEFAULT_SIZES = (1_000_000, 10_000_000, 124_000_000)


def build_parser() -> EnvDefaultsParser:
    parser = EnvDefaultsParser(prog="wanps bench checksum", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int_at_least(1), nargs="+", default=list(DEFAULT_SIZES), help="Elements d.")
    parser.add_argument("--repeats", type=int_at_least(1), default=7, help="Timed calls per size and method.")
    parser.add_argument("--threads", type=int_at_least(1), default=1, help="torch intra-op threads (the server uses 1).")
    parser.add_argument("--device", default="cpu", help="Also time the checksum on this device (e.g. cuda).")
    parser.add_argument("--json", default="", help="Also write the rows (and the machine's load) to this file.")
    return parser


def median_ms(call: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    call()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def measure(d: int, repeats: int, device: torch.device) -> dict:
    model = torch.randn(d, generator=torch.Generator().manual_seed(d))
    raw = model.numpy().view("u1")
    row = {
        "d": d,
        "checksum_cpu_ms": round(median_ms(lambda: model_checksum(model), repeats), 3),
        "crc32_cpu_ms": round(median_ms(lambda: zlib.crc32(raw), repeats), 3),
    }
    if device.type == "cuda":
        on_device = model.to(device)
        sync = torch.cuda.synchronize
        row["checksum_device_ms"] = round(median_ms(lambda: model_checksum(on_device), repeats, sync), 3)
        row["copy_to_host_ms"] = round(median_ms(lambda: on_device.cpu(), repeats, sync), 3)
        assert model_checksum(on_device) == model_checksum(model)
    return row


def format_table(rows: list[dict]) -> str:
    def rate(d: int, ms: float) -> str:
        return f"{4 * d / ms / 1e6:.1f}" if ms else "-"

    headers = ["d", "checksum ms", "GB/s", "crc32 ms", "GB/s", "crc32 / checksum"]
    device = "checksum_device_ms" in rows[0] if rows else False
    if device:
        headers += ["device checksum ms", "device->host copy ms"]
    cells = []
    for r in rows:
        row = [f"{r['d']:,}", f"{r['checksum_cpu_ms']:.2f}", rate(r["d"], r["checksum_cpu_ms"]),
               f"{r['crc32_cpu_ms']:.2f}", rate(r["d"], r["crc32_cpu_ms"]),
               f"{r['crc32_cpu_ms'] / r['checksum_cpu_ms']:.2f}x" if r["checksum_cpu_ms"] else "-"]
        if device:
            row += [f"{r['checksum_device_ms']:.3f}", f"{r['copy_to_host_ms']:.2f}"]
        cells.append(row)
    return text_table(headers, cells)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    rows = [measure(d, args.repeats, device) for d in args.sizes]
    print(format_table(rows))
    machine = machine_info()
    print(f"{load_summary(machine)}, torch threads {args.threads}")
    if args.json:
        write_json(args.json, {"threads": args.threads, "repeats": args.repeats, "device": str(device),
                               "machine": machine, "rows": rows})
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
