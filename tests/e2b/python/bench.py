#!/usr/bin/env python3
"""Benchmark: the E2B SDK against conductor's native API, on the same server.

One iteration of each side, interleaved so both see the same machine state:

  SDK     Sandbox.create("minimal") -> sandbox.commands.run("true") -> sandbox.kill()
  native  POST /workspaces {"agent_id": "bench", "environment": "minimal"}
          -> POST /workspaces/{id}/exec {"command": "true"}
          -> DELETE /workspaces/{id}?keep_volumes=false

Prints p50 and mean of each, their ratio (SDK / native) and the SDK's overhead in %.

  tests/e2b/python/.venv/bin/python tests/e2b/python/bench.py [--iterations 20] [--url http://127.0.0.1:PORT]

Without ``--url`` it starts its own ``conductor serve`` like conftest.py does (binary
``$CONDUCTOR_BIN`` or ``target/debug/conductor``). ``--api-key`` is the key of a server
that requires one (sent as E2B's ``X-API-KEY`` by the SDK and as a bearer token natively).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conductor_service import Service, ServiceError, start_service, stop_service  # noqa: E402


def sdk_iteration(url: str, api_key: str) -> float:
    from e2b import Sandbox

    start = time.perf_counter()
    sbx = Sandbox.create("minimal", api_url=url, sandbox_url=url, api_key=api_key)
    sbx.commands.run("true")
    if not sbx.kill():
        raise RuntimeError(f"the SDK could not kill {sbx.sandbox_id}")
    return time.perf_counter() - start


def native_iteration(http: httpx.Client) -> float:
    start = time.perf_counter()
    r = http.post("/workspaces", json={"agent_id": "bench", "environment": "minimal"})
    if r.status_code != 201:
        raise RuntimeError(f"POST /workspaces: {r.status_code} {r.text}")
    wid = r.json()["workspace_id"]
    r = http.post(f"/workspaces/{wid}/exec", json={"command": "true"})
    if r.status_code != 200 or r.json().get("exit_code") != 0:
        raise RuntimeError(f"POST /workspaces/{wid}/exec: {r.status_code} {r.text}")
    r = http.delete(f"/workspaces/{wid}", params={"keep_volumes": "false"})
    if r.status_code != 200:
        raise RuntimeError(f"DELETE /workspaces/{wid}: {r.status_code} {r.text}")
    return time.perf_counter() - start


def p50(xs: List[float]) -> float:
    return statistics.median(xs)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", "-n", type=int, default=20, help="iterations of each side (default 20)")
    ap.add_argument("--url", help="a running conductor (default: start one)")
    ap.add_argument("--api-key", default=None, help="the server's API key, when it requires one")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations of each side first (default 1)")
    args = ap.parse_args(argv)
    if args.iterations < 1:
        ap.error("--iterations must be at least 1")

    service: Optional[Service] = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        try:
            service = start_service(label="e2b-py-bench")
        except ServiceError as e:
            print(e, file=sys.stderr)
            return 1
        url = service.url
    api_key = args.api_key or "e2b_conductor_bench_0000000000000000"
    for name in ("E2B_DEBUG", "E2B_DOMAIN", "E2B_ACCESS_TOKEN"):
        os.environ.pop(name, None)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sdk: List[float] = []
    native: List[float] = []
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(120.0, connect=10.0)) as http:
            for _ in range(args.warmup):
                sdk_iteration(url, api_key)
                native_iteration(http)
            for i in range(args.iterations):
                # Alternate which side goes first, so neither always follows the other.
                if i % 2 == 0:
                    sdk.append(sdk_iteration(url, api_key))
                    native.append(native_iteration(http))
                else:
                    native.append(native_iteration(http))
                    sdk.append(sdk_iteration(url, api_key))
                print(f"  {i + 1:3d}/{args.iterations}  sdk {sdk[-1] * 1000:8.1f} ms   native {native[-1] * 1000:8.1f} ms", flush=True)
    except Exception as e:  # noqa: BLE001 - report and fail
        print(f"benchmark failed: {type(e).__name__}: {e}", file=sys.stderr)
        if service is not None:
            print(service.log_tail(), file=sys.stderr)
        return 1
    finally:
        if service is not None:
            stop_service(service)

    sdk_p50, native_p50 = p50(sdk), p50(native)
    sdk_mean, native_mean = statistics.mean(sdk), statistics.mean(native)
    print()
    print(f"create -> run('true') -> kill, {args.iterations} iterations each, interleaved, server {url}")
    print(f"{'':8} {'p50 ms':>10} {'mean ms':>10} {'min ms':>10} {'max ms':>10}")
    for name, xs in (("sdk", sdk), ("native", native)):
        print(f"{name:8} {p50(xs) * 1000:10.1f} {statistics.mean(xs) * 1000:10.1f} {min(xs) * 1000:10.1f} {max(xs) * 1000:10.1f}")
    print(f"ratio sdk/native: p50 {sdk_p50 / native_p50:.3f}, mean {sdk_mean / native_mean:.3f}")
    print(f"overhead: p50 {(sdk_p50 / native_p50 - 1) * 100:+.1f} %, mean {(sdk_mean / native_mean - 1) * 100:+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
