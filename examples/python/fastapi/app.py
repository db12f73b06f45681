"""A FastAPI app around a plain ``nn.Module``, served by zygote from the shared weights.

    python examples/python/fastapi/model.py /tmp/classifier.safetensors
    zygote start --model /tmp/classifier.safetensors --app app:app \\
        --app-dir examples/python/fastapi --workers 4

At import time the model is only a skeleton on the meta device; each worker binds the shared
weights in its ``post_fork`` function. ``POST /predict {"x": [16 floats]}`` answers the class
scores; every answer carries ``X-Worker-Pid``.
"""

from __future__ import annotations

import os

import torch
import zygote
import zygote.torch
from model import IN, Classifier
from pydantic import BaseModel

from fastapi import FastAPI, HTTPException

with torch.device("meta"):
    model = Classifier()


@zygote.post_fork
def bind() -> None:
    # `scale` is a non-persistent buffer: not in the weights file, so it is given here.
    zygote.torch.bind(model, buffers={"scale": torch.full((IN,), 0.5)})


app = FastAPI()


class Features(BaseModel):
    x: list[float]


@app.post("/predict")
def predict(features: Features) -> dict[str, object]:
    if len(features.x) != IN:
        raise HTTPException(422, f"x must hold {IN} numbers, not {len(features.x)}")
    with torch.inference_mode():
        scores = model(torch.tensor([features.x]))[0]
    return {"scores": scores.tolist(), "class": int(scores.argmax()), "pid": os.getpid()}


@app.get("/health")
def health() -> dict[str, object]:
    w = zygote.weights()
    return {"generation": w.generation, "backend": w.backend, "tensors": len(w)}
