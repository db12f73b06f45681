from sentence_transformers import SentenceTransformer
from flask import Flask, request, jsonify
import torch
import zygote, zygote.torch
from pathlib import Path

app = Flask(__name__)

def infer_torch_device():
    has_cuda = torch.cuda.is_available()
    if has_cuda:
        return "cuda"
    return "cpu"

current_path = Path(__file__).parent

model_name = "m3e-base"

model_path = zygote.model_dir()

device = infer_torch_device()

with zygote.torch.skeleton():
    m3e = SentenceTransformer(model_path, device=device)
@zygote.post_fork
def bind():
    zygote.torch.bind(m3e[0].auto_model)
zygote.warmup(lambda: m3e.encode(["warm up"]))

@app.route('/embed', methods=['POST'])
def embed():
    data = request.get_json()
    query_list = data.get("input", None)
    embeddings = m3e.encode(query_list)
    data = []
    for i, emb in enumerate(embeddings):
        item = {
            "object": "embedding",
            "embedding": emb.astype(float).tolist(),
            "index": i
        }
        data.append(item)
    result = {
        'object': "list",
        "data": data,
        "model": model_name,
        "usage": {
            "prompt_tokens": 11,
            "total_tokens": 11
        }
    }
    return jsonify(result)


if __name__ == '__main__':
    app.run(host='0.0.0.0', port=5000)

