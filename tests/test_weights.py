"""Reading weights: the safe .pt reader, the naming schemes, and the load errors.

Broken checkpoints are built from copies of the fixtures in tmp_path. Where a state dict has to
be rewritten as a .pt file the test uses torch.save (torch is a test dependency, not a runtime
one): those tests skip when torch is not installed.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, copy_variant, expected_json, expected_npz, variant_dir

import nanochat_mlx as nc
from nanochat_mlx.errors import CheckpointError, NanochatError
from nanochat_mlx.ptfile import read_pt
from nanochat_mlx.weights import read_safetensors

ATOL = 1e-4
TORCH_REASON = "torch is needed to write modified .pt state dicts (torch.save)"


def prompt_ids(variant: str, name: str = "p2_code_unicode") -> list[int]:
    return next(p["ids"] for p in expected_json(variant, "prompts.json")["prompts"] if p["name"] == name)


def logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0])


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def model_file(folder: Path) -> Path:
    return next(folder.glob("model_*.pt"))


@functools.cache
def fixture_state(variant: str) -> dict[str, np.ndarray]:
    """The fixture's state dict as float32 numpy arrays (bf16 -> f32 is exact)."""
    return {k: np.asarray(v, dtype=np.float32) for k, v in read_pt(model_file(variant_dir(variant))).items()}


def torch_state(folder: Path) -> dict:
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    return torch.load(model_file(folder), map_location="cpu", weights_only=True)


def save_state(folder: Path, state: dict) -> None:
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    torch.save(state, model_file(folder))


# --- the safe .pt reader --------------------------------------------------------------------


class _Exploit:
    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _write_handmade_pt(path: Path, payload: bytes) -> Path:
    """A torch-style zip (``archive/data.pkl`` + ``archive/version``) holding ``payload``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
    return path


def test_pt_with_os_system_global_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    marker = tmp_path / "pwned"
    path = tmp_path / "model_000001.pt"
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "x": _Exploit(os.system, f"touch {marker}")}, path)
    with pytest.raises(CheckpointError) as err:
        read_pt(path)
    message = str(err.value)
    assert str(path) in message
    assert "system" in message  # the global it asked for (posix.system / nt.system)
    assert not marker.exists()


def test_pt_with_builtins_eval_is_refused_without_torch(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(eval, f"open({str(marker)!r}, 'w').close()"), protocol=4)
    path = _write_handmade_pt(tmp_path / "model_000001.pt", payload)
    with pytest.raises(CheckpointError) as err:
        read_pt(path)
    assert str(path) in str(err.value)
    assert "builtins.eval" in str(err.value)
    assert not marker.exists()


def test_malicious_pt_refused_by_load(tmp_path: Path) -> None:
    folder = copy_variant("g1", tmp_path / "ckpt")
    (folder / "model_000500.pt").unlink()
    (folder / "meta_000500.json").rename(folder / "meta_000001.json")
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(os.system, f"touch {marker}"), protocol=2)
    path = _write_handmade_pt(folder / "model_000001.pt", payload)
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_truncated_pt_names_file(tmp_path: Path) -> None:
    path = tmp_path / "model_000500.pt"
    data = (variant_dir("g1") / "model_000500.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        read_pt(path)
    assert str(path) in str(err.value)


def test_truncated_pt_refused_by_load(tmp_path: Path) -> None:
    folder = copy_variant("g1", tmp_path / "ckpt")
    path = folder / "model_000500.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert str(path) in str(err.value)


def test_garbage_pt_names_file(tmp_path: Path) -> None:
    path = tmp_path / "model_000500.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as err:
        read_pt(path)
    assert str(path) in str(err.value)


def test_pt_reader_matches_torch_load() -> None:
    torch = pytest.importorskip("torch", reason="compares against torch.load")
    path = variant_dir("g9") / "model_000500.pt"
    ours = read_pt(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ours) == set(ref)
    for name, tensor in ref.items():
        assert str(ours[name].dtype) == str(tensor.dtype).removeprefix("torch."), name
        assert np.array_equal(np.asarray(ours[name], np.float32), tensor.float().numpy()), name


def _run_without_torch_check(body: str) -> subprocess.CompletedProcess:
    code = f"import sys\n{body}\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_reading_fixture_does_not_import_torch() -> None:
    """The .pt reader, tokenizer and validation (everything before the backend) are torch-free."""
    out = _run_without_torch_check(
        "from nanochat_mlx.checkpoint import read_checkpoint\n"
        f"ckpt = read_checkpoint({str(variant_dir('g9'))!r})\n"
        "print(ckpt.spec.name, tuple(ckpt.weights['transformer.wte.weight'].shape))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "g9 (448, 48)"


def test_mlx_load_does_not_import_torch() -> None:
    """Loading a fixture on the MLX backend and running it must not drag torch in (it is an
    optional dependency and costs seconds of start-up when it is installed)."""
    out = _run_without_torch_check(
        "import mlx.core as mx, nanochat_mlx as nc\n"
        f"m, t = nc.load({str(variant_dir('g9'))!r}, backend='mlx')\n"
        "print(tuple(m(mx.array([[t.get_bos_token_id(), 17, 42]])).shape))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 3, 400)"


# --- naming schemes -------------------------------------------------------------------------

TRANSFORMERS_NAMES = {
    "attn.c_q": "self_attn.q_proj",
    "attn.c_k": "self_attn.k_proj",
    "attn.c_v": "self_attn.v_proj",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def to_transformers_name(name: str) -> str:
    if name == "transformer.wte.weight":
        return "model.embed_tokens.weight"
    if name.startswith("transformer.h."):
        _, _, layer, rest = name.split(".", 3)
        module, _, suffix = rest.rpartition(".")
        return f"model.layers.{layer}.{TRANSFORMERS_NAMES[module]}.{suffix}"
    return name


def hf_config(variant: str, vocab_size: int | None = None) -> dict:
    mc = expected_json(variant, "model_info.json")["model_config"]
    return {
        "model_type": "nanochat",
        "architectures": ["NanoChatForCausalLM"],
        "hidden_size": mc["n_embd"],
        "intermediate_size": 4 * mc["n_embd"],
        "num_hidden_layers": mc["n_layer"],
        "num_attention_heads": mc["n_head"],
        "num_key_value_heads": mc["n_kv_head"],
        "vocab_size": vocab_size or mc["vocab_size"],
        "max_position_embeddings": mc["sequence_len"],
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }


def write_config_folder(folder: Path, variant: str, weights: dict[str, np.ndarray], config: dict) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    shutil.copy(variant_dir(variant) / "tokenizer" / "tokenizer.pkl", folder / "tokenizer.pkl")
    return folder


@pytest.mark.parametrize("variant", ["g1", "g2"])
def test_transformers_naming_matches_reference(tmp_path: Path, variant: str) -> None:
    weights = {to_transformers_name(k): v for k, v in fixture_state(variant).items()}
    assert "model.layers.0.mlp.fc1.weight" in weights
    folder = write_config_folder(tmp_path / "hf", variant, weights, hf_config(variant))
    model, _ = nc.load(str(folder), dtype="float32")
    ids = prompt_ids(variant)
    assert max_diff(logits(model, ids), expected_npz(variant, "logits_full.npz")["p2_code_unicode"]) <= ATOL


@pytest.mark.parametrize("variant", ["g1", "g2"])
def test_mlx_lm_naming_matches_reference(tmp_path: Path, variant: str) -> None:
    folder = write_config_folder(tmp_path / "mlxlm", variant, fixture_state(variant), hf_config(variant))
    model, _ = nc.load(str(folder), dtype="float32")
    ids = prompt_ids(variant)
    assert max_diff(logits(model, ids), expected_npz(variant, "logits_full.npz")["p2_code_unicode"]) <= ATOL


def test_mlx_lm_padded_vocab_config(tmp_path: Path) -> None:
    """mlx-lm's nanochat model sizes wte/lm_head by config vocab_size, so an mlx-lm folder of a
    padded (g2+) checkpoint records the padded row count (448); the tokenizer has 400 tokens."""
    folder = write_config_folder(tmp_path / "mlxlm", "g2", fixture_state("g2"), hf_config("g2", vocab_size=448))
    model, tokenizer = nc.load(str(folder), dtype="float32")
    assert tokenizer.get_vocab_size() == 400
    ids = prompt_ids("g2")
    assert max_diff(logits(model, ids), expected_npz("g2", "logits_full.npz")["p2_code_unicode"]) <= ATOL


def test_mlx_lm_folder_detected_layout(tmp_path: Path) -> None:
    from nanochat_mlx.sources import resolve

    folder = write_config_folder(tmp_path / "mlxlm", "g1", fixture_state("g1"), hf_config("g1"))
    assert resolve(str(folder)).layout == "mlx-lm"


def test_transformers_folder_detected_layout(tmp_path: Path) -> None:
    from nanochat_mlx.sources import resolve

    weights = {to_transformers_name(k): v for k, v in fixture_state("g1").items()}
    folder = write_config_folder(tmp_path / "hf", "g1", weights, hf_config("g1"))
    assert resolve(str(folder)).layout == "transformers"


# --- transformers' own NanoChat output ------------------------------------------------------


def _bf16_rounded(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import ml_dtypes

    return {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in state.items()}


@pytest.fixture(scope="module")
def bf16_native_logits(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Our load of the g1 fixture with every weight rounded to bfloat16 (what the converter stores)."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("g1bf16native")
    save_file(_bf16_rounded(fixture_state("g1")), str(folder / "model_000500.safetensors"))
    shutil.copy(variant_dir("g1") / "meta_000500.json", folder)
    shutil.copy(variant_dir("g1") / "tokenizer" / "tokenizer.pkl", folder)
    model, _ = nc.load(str(folder), dtype="float32")
    return logits(model, prompt_ids("g1"))


def _check_converted(folder: Path, bf16_native_logits: np.ndarray) -> None:
    model, tokenizer = nc.load(str(folder), dtype="float32")
    found = logits(model, prompt_ids("g1"))
    # The converter casts every float32 weight to bfloat16, so the reference logits (computed
    # from the float32 weights) are out of reach at 1e-4: bf16 rounding of the weights moves these
    # logits by ~1e-2. What must hold exactly is that we compute the same function of the stored
    # (bf16-rounded) weights as from a native folder holding those same values: float32 compute on
    # identical numbers, so 1e-4 (in practice 0).
    assert max_diff(found, bf16_native_logits) <= ATOL
    assert np.array_equal(found.argmax(-1), bf16_native_logits.argmax(-1))
    # And it is still recognisably the g1 reference (bf16 rounding only).
    ref = expected_npz("g1", "logits_full.npz")["p2_code_unicode"]
    assert max_diff(found, ref) < 0.1


def test_transformers_save_pretrained_output_loads(tmp_path: Path, bf16_native_logits: np.ndarray) -> None:
    """What the conversion script does at its core: rename, cast to bf16, NanoChatForCausalLM.save_pretrained."""
    torch = pytest.importorskip("torch", reason="transformers' NanoChat model needs torch")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    if not hasattr(transformers, "NanoChatForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no NanoChat model")
    mc = expected_json("g1", "model_info.json")["model_config"]
    config = transformers.NanoChatConfig(
        vocab_size=mc["vocab_size"],
        hidden_size=mc["n_embd"],
        intermediate_size=4 * mc["n_embd"],
        num_hidden_layers=mc["n_layer"],
        num_attention_heads=mc["n_head"],
        num_key_value_heads=mc["n_kv_head"],
        max_position_embeddings=mc["sequence_len"],
        tie_word_embeddings=False,
    )
    state = {
        to_transformers_name(k): torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in fixture_state("g1").items()
    }
    with torch.device("meta"):
        model = transformers.NanoChatForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    out = tmp_path / "converted"
    model.save_pretrained(out)
    shutil.copy(variant_dir("g1") / "tokenizer" / "tokenizer.pkl", out)
    assert "model.embed_tokens.weight" in read_safetensors(next(out.glob("*.safetensors")))
    _check_converted(out, bf16_native_logits)


def _find_converter() -> Path | None:
    try:
        import transformers
    except ImportError:
        return None
    found = sorted(Path(transformers.__file__).parent.rglob("convert_nanochat*.py"))
    return found[0] if found else None


def test_transformers_conversion_script(tmp_path: Path, bf16_native_logits: np.ndarray) -> None:
    pytest.importorskip("torch", reason="the conversion script needs torch")
    script = _find_converter()
    if script is None:
        pytest.skip(
            "transformers' convert_nanochat_checkpoints.py is not installed (the PyPI wheel leaves "
            "out the convert_* scripts); test_transformers_save_pretrained_output_loads covers its output"
        )
    src = tmp_path / "native"
    shutil.copytree(variant_dir("g1"), src, ignore=shutil.ignore_patterns("expected", "tokenizer"))
    shutil.copy(variant_dir("g1") / "tokenizer" / "tokenizer.pkl", src)
    out = tmp_path / "converted"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, str(script), "--input_dir", str(src), "--output_dir", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if run.returncode != 0:
        pytest.fail(f"conversion script failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    if not any(out.glob("tokenizer.*")):
        shutil.copy(src / "tokenizer.pkl", out)
    _check_converted(out, bf16_native_logits)


# --- errors ---------------------------------------------------------------------------------


def test_missing_meta(tmp_path: Path) -> None:
    folder = copy_variant("g1", tmp_path / "ckpt")
    (folder / "meta_000500.json").unlink()
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert "model_000500.pt" in str(err.value)
    assert "meta_000500.json" in str(err.value)


def test_missing_tokenizer(tmp_path: Path) -> None:
    folder = copy_variant("g1", tmp_path / "ckpt")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert str(folder) in str(err.value)
    assert "tokenizer" in str(err.value)


def test_tokenizer_of_another_vocab(tmp_path: Path) -> None:
    import tiktoken

    from nanochat_mlx.tokenizer import Tokenizer

    folder = copy_variant("g1", tmp_path / "ckpt")
    pkl = folder / "tokenizer" / "tokenizer.pkl"
    enc = Tokenizer.from_pickle(pkl).enc
    ranks = {b: r for b, r in enc._mergeable_ranks.items() if r < 300}
    specials = {s: 300 + i for i, s in enumerate(sorted(enc._special_tokens, key=enc._special_tokens.get))}
    small = tiktoken.Encoding(name="rustbpe", pat_str=enc._pat_str, mergeable_ranks=ranks, special_tokens=specials)
    pkl.write_bytes(pickle.dumps(small))
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    message = str(err.value)
    assert str(pkl) in message
    assert "309" in message and "400" in message


def test_meta_vocab_size_disagrees_with_tokenizer(tmp_path: Path) -> None:
    folder = copy_variant("g1", tmp_path / "ckpt")
    meta_path = folder / "meta_000500.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["vocab_size"] = 384
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert "384" in str(err.value)
    assert "tokenizer.pkl" in str(err.value)


def test_missing_tensor(tmp_path: Path) -> None:
    folder = copy_variant("g1", tmp_path / "ckpt")
    state = torch_state(folder)
    del state["transformer.h.2.mlp.c_fc.weight"]
    save_state(folder, state)
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert str(folder) in str(err.value)
    assert "missing" in str(err.value) and "transformer.h.2.mlp.c_fc.weight" in str(err.value)


def test_extra_tensor(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    folder = copy_variant("g1", tmp_path / "ckpt")
    state = torch_state(folder)
    state["transformer.h.0.attn.c_extra.weight"] = torch.zeros(4, 4)
    save_state(folder, state)
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert str(folder) in str(err.value)
    assert "unexpected" in str(err.value) and "transformer.h.0.attn.c_extra.weight" in str(err.value)


def test_wrong_shape(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    folder = copy_variant("g1", tmp_path / "ckpt")
    state = torch_state(folder)
    state["transformer.h.1.attn.c_q.weight"] = torch.zeros(40, 48)
    save_state(folder, state)
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    message = str(err.value)
    assert str(folder) in message and "transformer.h.1.attn.c_q.weight" in message
    assert "(40, 48)" in message and "(48, 48)" in message


def test_unknown_generation(tmp_path: Path) -> None:
    with pytest.raises(NanochatError) as err:
        nc.load(str(variant_dir("g1")), arch="g42")
    assert "g42" in str(err.value)
    assert "g1" in str(err.value) and "g9" in str(err.value)


@pytest.mark.parametrize("name", ["bigram_embed.embed.weight", "v0_lambdas"])
def test_unreleased_experiment_refused(tmp_path: Path, name: str) -> None:
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    folder = copy_variant("g5", tmp_path / "ckpt")
    state = torch_state(folder)
    state[name] = torch.zeros(400, 48) if name.endswith("weight") else torch.zeros(4)
    save_state(folder, state)
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert str(folder) in str(err.value)
    assert name in str(err.value)


def test_missing_step(tmp_path: Path) -> None:
    folder = variant_dir("g1-multistep")
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder), step=7)
    message = str(err.value)
    assert str(folder) in message and "7" in message
    assert "100" in message and "200" in message  # the steps that exist


def test_corrupt_meta_json(tmp_path: Path) -> None:
    folder = copy_variant("g1", tmp_path / "ckpt")
    meta = folder / "meta_000500.json"
    meta.write_text('{"step": 500, "model_config": {', encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert str(meta) in str(err.value)


def test_meta_without_model_config(tmp_path: Path) -> None:
    folder = copy_variant("g1", tmp_path / "ckpt")
    meta = folder / "meta_000500.json"
    meta.write_text(json.dumps({"step": 500}), encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert str(meta) in str(err.value) and "model_config" in str(err.value)


def test_config_json_missing_key(tmp_path: Path) -> None:
    config = hf_config("g1")
    del config["num_hidden_layers"]
    folder = write_config_folder(tmp_path / "mlxlm", "g1", fixture_state("g1"), config)
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert str(folder / "config.json") in str(err.value) and "num_hidden_layers" in str(err.value)


def test_truncated_safetensors_names_file(tmp_path: Path) -> None:
    folder = write_config_folder(tmp_path / "mlxlm", "g1", fixture_state("g1"), hf_config("g1"))
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        nc.load(str(folder))
    assert str(path) in str(err.value)
