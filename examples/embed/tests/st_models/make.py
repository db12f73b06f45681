"""Small BERT models of other shapes, saved by the pinned sentence-transformers, with its vectors.

Run by ``tests/st_layouts.rs`` (``python make.py OUT_DIR TOKENIZER_DIR``): for every shape below
it builds a randomly initialised BERT (seeded, so runs agree), saves it with
sentence-transformers in today's (6.x) layout, and also rewrites a copy into the 2.x-5.x layout
(``sentence_transformers.models.*`` module names, ``pooling_mode_*`` flags,
``word_embedding_dimension``, ``max_seq_length`` and ``do_lower_case`` in
``sentence_bert_config.json``). Each directory gets ``expected.json``: the sentences and the
vectors sentence-transformers computes from that very directory, without and with a prompt.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer, models
from transformers import BertConfig, BertModel, BertTokenizerFast

SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "Zygotes fork workers that share one copy of the weights.",
    "short",
    "Numbers 1234 and symbols #@! are tokenised too, naïvely or not.",
    " ".join(["a long text that is truncated at the model's maximum length"] * 40),
]

# name, hidden, layers, heads, intermediate, pooling, normalize, max_seq_length, layout
SHAPES = [
    ("cls-256x4", 256, 4, 8, 512, "cls", False, 128, "st6"),
    ("max-128x2", 128, 2, 4, 256, "max", True, 96, "st6"),
    ("sqrt-192x3", 192, 3, 6, 384, "mean_sqrt_len_tokens", False, 128, "legacy"),
    ("mean-64x1", 64, 1, 2, 128, "mean", True, 64, "legacy"),
]

LEGACY_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
}


def to_legacy(out: Path, hidden: int, pooling: str, max_len: int) -> None:
    """Rewrites a directory saved by sentence-transformers 6.x into the 2.x-5.x layout."""
    modules = json.loads((out / "modules.json").read_text())
    for m in modules:
        m["type"] = "sentence_transformers.models." + m["type"].rsplit(".", 1)[1]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    flags = {flag: mode == pooling for mode, flag in LEGACY_FLAGS.items()}
    flags["pooling_mode_weightedmean_tokens"] = False
    flags["pooling_mode_lasttoken"] = False
    pool = {"word_embedding_dimension": hidden, **flags}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pool, indent=2))
    sbert = {"max_seq_length": max_len, "do_lower_case": False}
    (out / "sentence_bert_config.json").write_text(json.dumps(sbert, indent=2))
    # The older layout's tokenizer config carries the checkpoint's own length (512 for BERT).
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg["model_max_length"] = 512
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


def build(root: Path, tokenizer_dir: Path, shape: tuple) -> None:
    name, hidden, layers, heads, inter, pooling, normalize, max_len, layout = shape
    tok = BertTokenizerFast.from_pretrained(str(tokenizer_dir))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=512,
        # Wider than BERT's 0.02, so that different texts get clearly different vectors.
        initializer_range=0.3,
    )
    torch.manual_seed(len(name) * 7919 + hidden)
    base = root / f"{name}-base"
    BertModel(cfg).eval().save_pretrained(str(base))
    tok.save_pretrained(str(base))
    transformer = models.Transformer(str(base), max_seq_length=max_len)
    modules = [transformer, models.Pooling(hidden, pooling_mode=pooling)]
    if normalize:
        modules.append(models.Normalize())
    st = SentenceTransformer(modules=modules, prompts={"query": "query: "}, device="cpu")
    out = root / name
    st.save(str(out))
    shutil.rmtree(base)
    if layout == "legacy":
        to_legacy(out, hidden, pooling, max_len)
    # The reference: what sentence-transformers computes from the directory as saved.
    st = SentenceTransformer(str(out), device="cpu")
    assert st.max_seq_length == max_len, (name, st.max_seq_length)
    plain = st.encode(SENTENCES, convert_to_numpy=True)
    prompted = st.encode(SENTENCES, prompt_name="query", convert_to_numpy=True)
    expected = {
        "sentences": SENTENCES,
        "pooling": pooling,
        "normalize": normalize,
        "max_seq_length": max_len,
        "layout": layout,
        "embeddings": plain.tolist(),
        "query_embeddings": prompted.tolist(),
    }
    (out / "expected.json").write_text(json.dumps(expected))


def main() -> None:
    root, tokenizer_dir = Path(sys.argv[1]), Path(sys.argv[2])
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for shape in SHAPES:
        build(root, tokenizer_dir, shape)
        print(shape[0], flush=True)


if __name__ == "__main__":
    main()
