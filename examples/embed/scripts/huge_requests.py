#!/usr/bin/env python3
"""Small requests' latency while huge ones compute (standard library only).

    huge_requests.py --url http://127.0.0.1:8000 [--huge 2] [--small-conns 4] [--seconds 40]

Sends ``--huge`` requests of 256 texts of 256 word pieces each (254 ``!``, each its own word
piece, plus [CLS] and [SEP]: about 68 KB) at once, on connections of their own, while
``--small-conns`` keep-alive connections send one short sentence after another for
``--seconds``. Prints one JSON object: the huge requests' status and time, and the small ones'
count, failures and latency percentiles. With the app's default budget the huge requests are
refused (413); with ``ZYGOTE_EMBED_MAX_REQUEST_TOKENS=65536`` they are computed in passes while
the small ones go on.
"""

import argparse
import http.client
import json
import statistics
import threading
import time
from urllib.parse import urlparse

SMALL = json.dumps({"input": ["A man is playing a guitar."]})
HUGE = json.dumps({"input": ["!" * 254] * 256})


def post(conn, body):
    conn.request("POST", "/embed", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def huge(host, port, out, i):
    start = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    try:
        status = post(conn, HUGE)
    except OSError as e:
        status = f"error: {e}"
    out[i] = {"status": status, "seconds": round(time.monotonic() - start, 2)}


def small(host, port, until, lat, fails):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    while time.monotonic() < until:
        start = time.monotonic()
        try:
            status = post(conn, SMALL)
        except OSError as e:
            fails.append(str(e))
            conn = http.client.HTTPConnection(host, port, timeout=60)
            continue
        if status == 200:
            lat.append(time.monotonic() - start)
        else:
            fails.append(status)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--huge", type=int, default=2)
    ap.add_argument("--small-conns", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=40)
    a = ap.parse_args()
    u = urlparse(a.url)
    host, port = u.hostname, u.port or 80
    until = time.monotonic() + a.seconds
    lat, fails = [], []
    smalls = [
        threading.Thread(target=small, args=(host, port, until, lat, fails))
        for _ in range(a.small_conns)
    ]
    for t in smalls:
        t.start()
    time.sleep(1)
    results = [None] * a.huge
    huges = [threading.Thread(target=huge, args=(host, port, results, i)) for i in range(a.huge)]
    for t in huges:
        t.start()
    for t in smalls + huges:
        t.join()
    lat.sort()

    def pct(p):
        return round(1000 * lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 1)

    print(
        json.dumps(
            {
                "huge": results,
                "huge_body_bytes": len(HUGE),
                "small": {
                    "ok": len(lat),
                    "failed": len(fails),
                    "failures": fails[:5],
                    "p50_ms": pct(50) if lat else None,
                    "p99_ms": pct(99) if lat else None,
                    "max_ms": round(1000 * lat[-1], 1) if lat else None,
                    "mean_ms": round(1000 * statistics.mean(lat), 1) if lat else None,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
