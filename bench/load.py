#!/usr/bin/env python3
"""Steady HTTPS load for the benchmarks: N clients GET a URL over kept-alive connections until
SECONDS pass or STOP_FILE appears, then print one JSON line: requests, failures, latencies."""
import http.client
import json
import os
import ssl
import sys
import threading
import time
from urllib.parse import urlparse


def main():
    url, clients, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    stop_file = sys.argv[4] if len(sys.argv) > 4 else None
    target = urlparse(url)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + seconds
    latencies, failures, lock = [], [], threading.Lock()

    def client():
        connection = None
        while time.monotonic() < deadline and not (stop_file and os.path.exists(stop_file)):
            started = time.monotonic()
            try:
                if connection is None:
                    connection = http.client.HTTPSConnection(target.hostname, target.port, context=context, timeout=10)
                connection.request("GET", target.path or "/")
                response = connection.getresponse()
                body = response.read()
                ok = response.status == 200
                if response.getheader("connection", "").lower() == "close":
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as error:
                ok, body = False, repr(error).encode()
                if connection is not None:
                    connection.close()
                connection = None
            elapsed = time.monotonic() - started
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    failures.append(body[:100].decode(errors="replace"))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()

    def percentile(p):
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000, 1) if latencies else None

    print(json.dumps({
        "served": len(latencies), "failed": len(failures), "failures": failures[:5],
        "p50_ms": percentile(0.50), "p99_ms": percentile(0.99),
    }))


if __name__ == "__main__":
    main()
