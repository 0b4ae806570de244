"""Model loading: a resolved model directory's identity, shape, tokenizer and weights (where a spec
resolves to: ``libs/engine/modelpath.py``). Nothing is fetched from a hub.

KV layout used everywhere (transfer to decode, cache blocks):
``[num_layers, 2 (K then V), num_kv_heads, length, head_dim]``, contiguous, in the model dtype.
Keys are stored after rotary embedding, exactly as the attention layers cache them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from libs.engine.device import EngineConfigError
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
