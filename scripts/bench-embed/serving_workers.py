"""Prints the pids of a zygote service's serving workers, one a line (bench-python.sh).

python3 serving_workers.py ZYGOTE_BIN RUNTIME_DIR
"""

import json
import subprocess
import sys

out = subprocess.run(
    [sys.argv[1], "status", "--json", "--runtime-dir", sys.argv[2]],
    capture_output=True,
    text=True,
    timeout=10,
)
if out.returncode == 0:
    for p in json.loads(out.stdout)["processes"]:
        if p.get("role") == "worker" and p.get("state") == "serving":
            print(p["pid"])
