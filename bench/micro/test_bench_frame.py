"""Frame scanner micro benchmarks: 1000 frames scanned inside the core per call
(bench_scan loops fr_scan in C), so the figure is the scanner's, not Python's.

    PYTHONPATH=src python -m pytest bench/micro/test_bench_frame.py --benchmark-only
ns/frame = mean / FRAMES (printed in extra_info)."""

import pytest

from octoproxy._core import frame as F

FRAMES = 1000


def _request(body_len: int, checksum: bool = False) -> bytes:
    # a realistic mesh request: service name, timeout, trace id, routing keys
    return F.encode_request(
        123456789, "com.sankuai.octo.EchoService", b"x" * body_len, timeout=1000,
        trace_info={"clientAppkey": "com.sankuai.caller", "traceId": "7d1f0c5e9a2b4c3d",
                    "spanId": "0.1.2"},
        global_context={"octo-set": "set-bj-1", "octo-swimlane": "lane-a"},
        local_context={"octo-remote-appkey": "com.sankuai.octo.echo"},
        checksum=checksum)


@pytest.mark.parametrize("body_len", [128, 4096])
def test_scan_requests(benchmark, body_len):
    buf = _request(body_len) * FRAMES
    assert benchmark(F.bench_scan, buf) == FRAMES
    benchmark.extra_info["frame_bytes"] = len(buf) // FRAMES
    benchmark.extra_info["ns_per_frame"] = benchmark.stats.stats.mean / FRAMES * 1e9


@pytest.mark.parametrize("body_len", [128, 4096])
def test_scan_requests_with_checksum(benchmark, body_len):
    # Adler-32 over every byte: the cost grows with the frame
    buf = _request(body_len, checksum=True) * FRAMES
    assert benchmark(F.bench_scan, buf) == FRAMES
    benchmark.extra_info["ns_per_frame"] = benchmark.stats.stats.mean / FRAMES * 1e9


def test_scan_native_thrift(benchmark):
    buf = F.encode_thrift_message("echo", 1, 42, b"\x0b\x00\x01" + b"x" * 128) * FRAMES
    assert benchmark(F.bench_scan, buf) == FRAMES
    benchmark.extra_info["ns_per_frame"] = benchmark.stats.stats.mean / FRAMES * 1e9


def test_python_scan_api(benchmark):
    # the Python-level scan(): one Frame object (and a copy) per frame
    buf = _request(128) * FRAMES
    frames, _ = benchmark(F.scan, buf)
    assert len(frames) == FRAMES
    benchmark.extra_info["ns_per_frame"] = benchmark.stats.stats.mean / FRAMES * 1e9
