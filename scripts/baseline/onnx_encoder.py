"""all-MiniLM-L6-v2 on ONNX Runtime, pooled as sentence-transformers pools it.

The encoder exported by `export_onnx.py`, run by an ONNX Runtime session on the CPU
with one intra-op thread (`ORT_THREADS` overrides it) and no inter-op pool; the
word pieces come from the model's `tokenizer.json` through the `tokenizers` library (the
same Rust tokenizer sentence-transformers uses), truncated to the model's
`max_seq_length`; the vectors are mean-pooled over the attention mask and L2-normalised,
as the model's `1_Pooling` and `2_Normalize` modules do. Shared by the ONNX Runtime
service (`app_onnx.py`) and the forward-pass benchmark (`scripts/bench-embed/forward.py`).
"""

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def _max_seq_length(model: Path) -> int:
    for name, key in [
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
    ]:
        path = model / name
        if path.is_file():
            value = json.loads(path.read_text()).get(key)
            if isinstance(value, int) and 0 < value <= 100_000:
                return value
    return 512


class OnnxEncoder:
    """Texts in, unit-length float32 vectors out (`[texts, hidden]`)."""

    def __init__(self, model: Path, onnx_file: Path, threads: int | None = None):
        if threads is None:
            threads = int(os.environ.get("ORT_THREADS", "1"))
        self.tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
        self.tokenizer.enable_truncation(_max_seq_length(model))
        self.tokenizer.enable_padding(pad_id=0)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(onnx_file), opts, providers=["CPUExecutionProvider"]
        )

    def encode(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        types = np.array([e.type_ids for e in enc], dtype=np.int64)
        (hidden,) = self.session.run(
            None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        )
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        norm = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.clip(norm, 1e-12, None)
