"""Export the baseline's model (all-MiniLM-L6-v2) to ONNX once, for the ONNX Runtime baseline.

The ONNX Runtime service (`app_onnx.py`) runs the BERT encoder exported here with
`torch.onnx.export` (opset 17, the TorchScript exporter: `dynamo=False`), taking
`input_ids`, `attention_mask` and `token_type_ids` of shape `[batch, seq]` (both axes
dynamic) and giving `last_hidden_state` `[batch, seq, hidden]`; the service pools and
normalises as sentence-transformers does. The file is cached at
`bench-out/onnx/<model name>-opset17.onnx` (git-ignored) and rewritten only when missing
or older than the model's weights; `--out` puts it elsewhere, `--force` rewrites it.

    .venv-baseline/bin/python scripts/baseline/export_onnx.py   # prints the file's path

After the export, the graph is checked against torch on a few sentences (largest
absolute difference of the hidden states), so a bad export stops here, not in a benchmark.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_dir import model_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OPSET = 17
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def default_path(model: Path) -> Path:
    return REPO / "bench-out" / "onnx" / f"{model.name}-opset{OPSET}.onnx"


def export(model: Path, out: Path) -> None:
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(model))
    # Eager attention: the SDPA path traces its mask handling into constants.
    bert = AutoModel.from_pretrained(str(model), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        """The three inputs by name: BertModel.forward's positional order is not theirs."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state

    sample = tok(
        ["Hello, world!", "A somewhat longer sentence, to give the export two lengths."],
        padding=True,
        return_tensors="pt",
    )
    args = tuple(sample[name] for name in INPUTS)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with torch.no_grad():
        torch.onnx.export(
            Encoder(bert),
            args,
            str(tmp),
            input_names=INPUTS,
            output_names=["last_hidden_state"],
            dynamic_shapes={name: {0: batch, 1: seq} for name in INPUTS},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    # The check: ONNX Runtime's hidden states against torch's, on other lengths than the
    # export's sample.
    import onnxruntime as ort

    check = tok(
        ["One.", "The quick brown fox jumps over the lazy dog, twice over."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        want = bert(**{k: check[k] for k in INPUTS}).last_hidden_state.numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: check[k].numpy() for k in INPUTS})[0]
    diff = float(np.abs(got - want).max())
    if diff > 1e-3:
        raise SystemExit(f"export_onnx.py: the exported graph differs from torch by {diff}")
    tmp.replace(out)
    print(f"export_onnx.py: wrote {out} (largest difference to torch {diff:.2e})", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="where to write (default: bench-out/onnx/)")
    p.add_argument("--force", action="store_true", help="export even when the file is fresh")
    args = p.parse_args()
    model = model_dir()
    out = args.out or default_path(model)
    weights = model / "model.safetensors"
    fresh = out.is_file() and out.stat().st_mtime >= weights.stat().st_mtime
    if args.force or not fresh:
        export(model, out)
    print(out)


if __name__ == "__main__":
    main()
