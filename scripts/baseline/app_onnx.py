"""The ONNX Runtime baseline: gunicorn + Flask + ONNX Runtime answering /embed.

What a CPU user would deploy instead of sentence-transformers on torch: the same
model (all-MiniLM-L6-v2, exported once to ONNX by `export_onnx.py`, opset 17) run by
ONNX Runtime with one intra-op thread per worker (`onnx_encoder.py`), behind the same
Flask route, request and response as `app.py` (the seed 002 service), including its
`X-Worker-Pid` header. Start it with `BASELINE_APP=app_onnx scripts/baseline/run.sh
WORKERS PORT --preload`: the session is built at import time, so with `--preload` the
master builds it once and the workers share its pages copy-on-write.

`BASELINE_ONNX` names the exported file (default: where `export_onnx.py` caches it).
"""

import os
import sys
from pathlib import Path

from flask import Flask, jsonify, request

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_onnx import default_path  # noqa: E402
from model_dir import model_dir  # noqa: E402
from onnx_encoder import OnnxEncoder  # noqa: E402

app = Flask(__name__)

model_name = "all-MiniLM-L6-v2"
model_path = model_dir()
onnx_file = Path(os.environ.get("BASELINE_ONNX") or default_path(model_path))
if not onnx_file.is_file():
    raise SystemExit(f"app_onnx: no {onnx_file}; run scripts/baseline/export_onnx.py")

encoder = OnnxEncoder(model_path, onnx_file)


@app.after_request
def _worker_pid(response):
    # Read at request time: with --preload the module is imported in the master.
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


@app.route("/embed", methods=["POST"])
def embed():
    data = request.get_json()
    query_list = data.get("input", None)
    if isinstance(query_list, str):
        query_list = [query_list]
    embeddings = encoder.encode(query_list)
    data = [
        {"object": "embedding", "embedding": emb.astype(float).tolist(), "index": i}
        for i, emb in enumerate(embeddings)
    ]
    result = {
        "object": "list",
        "data": data,
        "model": model_name,
        "usage": {"prompt_tokens": 11, "total_tokens": 11},
    }
    return jsonify(result)
