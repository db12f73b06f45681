"""zygote.torch.bind on plain modules built under the meta device, with tensors given as a
dict (bind takes any mapping of names to tensors): every check, every error, the ties, the
buffers; and on sentence-transformers all-MiniLM-L6-v2, against the same model loaded the
ordinary way."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURE, model_dir
from torch import nn

import zygote.torch
from zygote.torch import BindError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 3)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied, as language-model heads are
        self.register_buffer("mean", torch.zeros(4))  # persistent
        self.register_buffer("ids", torch.arange(5), persistent=False)


def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "emb.weight": torch.randn(10, 4),
        "proj.weight": torch.randn(3, 4),
        "proj.bias": torch.randn(3),
        "mean": torch.randn(4),
    }


def meta_net() -> Net:
    with torch.device("meta"):
        return Net()


def test_binds_without_copying_and_reties():
    w = weights()
    net = zygote.torch.bind(meta_net(), w, buffers={"ids": torch.arange(5)})
    for name in ("emb.weight", "proj.weight", "proj.bias", "mean"):
        got = net.get_parameter(name) if "mean" not in name else net.get_buffer(name)
        assert got.data_ptr() == w[name].data_ptr(), name
    assert net.head.weight is net.emb.weight
    assert all(not p.requires_grad for p in net.parameters())
    assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])
    assert torch.equal(net.ids, torch.arange(5))
    assert not net.training


def test_a_module_that_customises_loading_is_bound_through_load_state_dict():
    # bind puts tensors straight into the slots only when no module customises loading; a
    # load hook still runs (here it records the keys it saw).
    net = meta_net()
    seen: list[str] = []

    def hook(module, state_dict, prefix, *rest):  # noqa: ANN001, ANN202 - torch's signature
        seen.extend(k for k in state_dict if k.startswith(prefix))

    net.proj._register_load_state_dict_pre_hook(hook, with_module=True)
    w = weights()
    zygote.torch.bind(net, w, buffers={"ids": torch.arange(5)})
    assert sorted(seen) == ["proj.bias", "proj.weight"], seen
    assert net.proj.weight.data_ptr() == w["proj.weight"].data_ptr()
    assert all(not p.requires_grad for p in net.parameters())


def test_every_mismatch_in_one_error():
    w = weights()
    del w["proj.bias"]
    w["proj.weight"] = torch.randn(3, 5)
    w["mean"] = torch.zeros(4, dtype=torch.float64)
    w["extra.weight"] = torch.zeros(1)
    with pytest.raises(BindError) as e:
        zygote.torch.bind(meta_net(), w, buffers={"ids": torch.arange(5)})
    err = e.value
    assert err.missing == ["proj.bias"]
    assert err.unexpected == ["extra.weight"]
    assert sorted(k for k, _ in err.mismatched) == ["mean", "proj.weight"]
    text = str(err)
    for part in ("proj.bias", "extra.weight", "shape (3, 5), module (3, 4)", "torch.float64"):
        assert part in text
    assert "fix:" in text


def test_nothing_changes_when_the_check_fails():
    net = meta_net()
    w = weights()
    del w["mean"]
    with pytest.raises(BindError):
        zygote.torch.bind(net, w)
    assert all(p.is_meta for p in net.parameters())


def test_strict_false_ignores_unexpected_and_prefix_selects():
    w = {f"model.{k}": v for k, v in weights().items()}
    w["model.other"] = torch.zeros(1)
    w["unrelated"] = torch.zeros(1)
    with pytest.raises(BindError) as e:
        zygote.torch.bind(meta_net(), w, prefix="model.", buffers={"ids": torch.arange(5)})
    assert e.value.unexpected == ["model.other"]
    net = zygote.torch.bind(
        meta_net(), w, prefix="model.", strict=False, buffers={"ids": torch.arange(5)}
    )
    assert net.proj.bias.data_ptr() == w["model.proj.bias"].data_ptr()


def test_a_meta_buffer_it_cannot_compute_is_an_error():
    with pytest.raises(BindError) as e:
        zygote.torch.bind(meta_net(), weights())
    assert e.value.unmaterialised == ["ids"]
    assert "buffers=" in str(e.value)


def test_sentence_transformers_matches_the_ordinary_load():
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    ref = json.loads(FIXTURE.read_text())
    path = str(model_dir())
    with zygote.torch.skeleton():
        model = SentenceTransformer(path, device="cpu")
    assert all(p.is_meta for p in model.parameters())
    shared = load_file(str(model_dir() / "model.safetensors"))
    zygote.torch.bind(model[0].auto_model, shared)
    first = next(iter(model[0].auto_model.named_parameters()))
    assert first[1].data_ptr() == shared[first[0]].data_ptr()
    got = model.encode(ref["sentences"], convert_to_tensor=True)
    ordinary = SentenceTransformer(path, device="cpu")
    want = ordinary.encode(ref["sentences"], convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(got, want)
    assert cos.min().item() >= 0.9999, cos.min()
    fixture = torch.tensor(ref["embeddings"])
    assert torch.nn.functional.cosine_similarity(got, fixture).min().item() >= 0.9999


class Embeddings(nn.Module):
    """Like BERT's embeddings: a Hugging Face initialiser computes both buffers at once."""

    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(10, 4)
        self.register_buffer("position_ids", torch.arange(6).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, 6, dtype=torch.long), False)


class HfLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = Embeddings()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, Embeddings):
            module.position_ids.copy_(torch.arange(6).expand((1, -1)))
            module.token_type_ids.zero_()
            module.word.weight.normal_()


def test_hugging_face_initialiser_fills_buffers_and_writes_nothing_shared():
    with torch.device("meta"):
        model = HfLike()
    shared = {
        "embeddings.word.weight": torch.randn(10, 4),
        # Old checkpoints saved position_ids: bound from the weights, not computed.
        "embeddings.position_ids": torch.arange(6).flip(0).expand((1, -1)).clone(),
    }
    before = {k: v.clone() for k, v in shared.items()}
    zygote.torch.bind(model, shared)
    e = model.embeddings
    assert e.position_ids.data_ptr() == shared["embeddings.position_ids"].data_ptr()
    assert torch.equal(e.token_type_ids, torch.zeros(1, 6, dtype=torch.long))
    for k, v in shared.items():
        assert torch.equal(v, before[k]), f"the initialiser wrote into {k}"


def test_refuses_the_f16_form_of_the_compute_copy_by_name():
    # What `zygote start --host-weights f16` exports: matrices in f16, vectors in f32.
    w = weights()
    for name in ("emb.weight", "proj.weight"):
        w[name] = w[name].half()
    with pytest.raises(BindError) as e:
        zygote.torch.bind(meta_net(), w, buffers={"ids": torch.arange(5)})
    msg = str(e.value)
    assert "--host-weights f16" in msg and "--host-weights f32" in msg, msg
    assert {k for k, _ in e.value.mismatched} == {"emb.weight", "proj.weight"}
    # Another dtype mismatch does not blame the f16 form.
    w = weights()
    w["proj.bias"] = w["proj.bias"].double()
    with pytest.raises(BindError) as e:
        zygote.torch.bind(meta_net(), w, buffers={"ids": torch.arange(5)})
    assert "--host-weights" not in str(e.value)
