"""Device, dtype and load format: what `auto` resolves to and why, the errors for what this machine
cannot run (before any service starts), dummy weights, and KV of another dtype never reused."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from libs.engine.device import EngineConfigError, parse_device, resolve
from libs.engine.dtypechoice import choice_path, load as load_choice, placement_for
from libs.engine.loading import load_model, model_identity
from libs.engine.runner import ModelRunner
from helpers import start_up
from libs.natsserver import free_port

NO_GPU = not torch.cuda.is_available()


def test_device_and_dtype_specs():
    assert parse_device("auto") is None
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("cuda") == torch.device("cuda:0")
    assert parse_device("cuda:3") == torch.device("cuda:3")
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(EngineConfigError, match="unknown device"):
            parse_device(bad)
    with pytest.raises(EngineConfigError, match="unknown dtype"):
        resolve("cpu", "int8")
    p = resolve("cpu", "bfloat16")
    assert (p.device, p.dtype) == (torch.device("cpu"), torch.bfloat16) and "as configured" in p.why
    # auto on a CPU with nothing measured: float32, and the reason says so
    p = resolve("cpu", "auto")
    assert p.dtype == torch.float32 and "nothing measured" in p.why


@pytest.mark.skipif(not NO_GPU, reason="checks the errors of a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(EngineConfigError, match="torch sees no GPU"):
            resolve(spec, "auto")
    p = resolve("auto", "float32")
    assert p.device == torch.device("cpu") and "no GPU" in p.why


def test_cpu_auto_measures_once_and_keeps_the_choice(tiny_dir, tmp_path):
    placement = placement_for(tiny_dir, "cpu", "auto", tmp_path, threads=1)
    kept = choice_path(tmp_path, model_identity(tiny_dir), 1)
    choice = load_choice(kept)
    assert choice is not None and choice.chosen == placement.dtype_name
    assert {t.dtype for t in choice.timings} == {"bfloat16", "float32"}
    fastest = min(choice.timings, key=lambda t: t.request_seconds)
    assert choice.chosen == fastest.dtype and all(t.request_seconds > 0 for t in choice.timings)
    assert placement.dtype_name in placement.why and "measured" in placement.why
    # the kept choice answers from now on, whatever a new measurement would say
    kept.write_text(kept.read_text().replace(f'"chosen": "{choice.chosen}"',
                                             f'"chosen": "{"float32" if choice.chosen == "bfloat16" else "bfloat16"}"'))
    again = placement_for(tiny_dir, "cpu", "auto", tmp_path, threads=1, measure_now=False)
    assert again.dtype_name != placement.dtype_name
    # another thread count is another machine as far as the choice goes: not measured when told not to
    other = placement_for(tiny_dir, "cpu", "auto", tmp_path, threads=2, measure_now=False)
    assert other.dtype == torch.float32 and "nothing measured" in other.why


def test_dummy_weights_from_a_config_only_directory(tiny_dir, tmp_path):
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    for f in tiny_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, only_config / f.name)
    with pytest.raises(FileNotFoundError, match="--load-format dummy"):
        load_model(only_config)
    a = ModelRunner(only_config, threads=1, load_format="dummy")
    b = ModelRunner(only_config, threads=1, load_format="dummy")
    # the same weights in every process of a cluster: prefill on one instance, decode on another
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name
    assert all(p.std() > 0 for p in a.model.parameters() if p.dim() > 1)  # drawn, not left empty
    # dummy KV lives in a namespace of its own, even in a directory that has real weights
    assert model_identity(tiny_dir, "dummy") != model_identity(tiny_dir)
    assert model_identity(only_config, "dummy") == model_identity(tiny_dir, "dummy")
    logits, kv = a.prefill(list(range(100, 140)))
    assert torch.isfinite(logits).all() and kv.shape[3] == 40


def _up(args, data_dir, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("YUEBING_DEVICE", "YUEBING_DTYPE")}
    return subprocess.run([sys.executable, "-m", "yuebing.cli", "up", "--data-dir", str(data_dir),
                           "--port", str(free_port()), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(not NO_GPU, reason="checks the errors of a machine without a GPU")
def test_up_refuses_what_cannot_run_before_starting_anything(tiny_dir, tmp_path):
    no_config = tmp_path / "empty-model"
    no_config.mkdir()
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    shutil.copy(tiny_dir / "config.json", only_config / "config.json")
    cases = [
        (["--model", str(tiny_dir), "--device", "cuda"], "torch sees no GPU"),
        (["--model", str(tiny_dir), "--device", "cuda:x"], "unknown device"),
        (["--model", str(no_config), "--load-format", "dummy"], "no config.json"),
        (["--model", str(only_config)], "--load-format dummy"),
    ]
    for args, message in cases:
        data = tmp_path / f"data-{len(message)}"
        r = _up(args, data)
        assert r.returncode == 2, r.stdout + r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr
        # nothing started: no service wrote a log, no NATS server store
        logs = data / "logs"
        assert not logs.exists() or not any(p.name.endswith(".log") and p.stat().st_size for p in logs.iterdir())
        assert not (data / "nats").exists()


def test_up_prints_what_it_chose_and_why(tiny_dir, tmp_path):
    """`up --dtype auto` measures once, says what it chose, and every worker runs that choice."""
    import signal

    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("YUEBING_DEVICE", "YUEBING_DTYPE")}
    port = free_port()
    proc, lines, ready = start_up(tiny_dir, data, port, "--no-auth", "--threads", "1", env=env)
    try:
        assert ready.wait(180), "".join(lines[-30:])
        choice = load_choice(choice_path(data, model_identity(tiny_dir), 1))
        assert choice is not None
        engine = next(line for line in lines if line.startswith("engine: "))
        assert f"cpu {choice.chosen}" in engine and "measured faster" in engine
        assert any("measuring bfloat16 against float32" in line for line in lines)
        import urllib.request

        health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10))
        workers = [w for w in health["workers"] if w["kind"] in ("prefill", "decode")]
        assert workers and all((w["device"], w["dtype"]) == ("cpu", choice.chosen) for w in workers), workers
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
