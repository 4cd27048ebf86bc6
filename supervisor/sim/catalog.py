"""What the fake services have installed: Ollama models and ComfyUI checkpoints.

Sizes and GGUF metadata are taken from real models so that VRAM estimates a supervisor
makes from `/api/show` land near what the sim then allocates. Also here: Ollama's model
name normalisation and `keep_alive` parsing (api-facts 1.2, 1.6), both pure.

A catalogue can be replaced from JSON (`--catalog`): `{"models": [...], "checkpoints":
[...]}`, each entry with the field names of `ModelSpec` / `CheckpointSpec`; only `name` and
`size_bytes` are required.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from supervisor.sim.gpu import GIB, MIB

# Memory bandwidth that sets a model's speed fully on GPU: tokens/s ~ bandwidth / weights.
# 400 GiB/s gives ~100 tok/s for a 4 GiB model, in line with a 4090 running an 8B Q4.
GPU_BYTES_PER_S = 400 * GIB


@dataclass(frozen=True)
class ModelSpec:
    """An installed Ollama model. `size_bytes` is the on-disk size (/api/tags `size`)."""

    name: str
    size_bytes: int
    family: str = "llama"
    parameter_size: str = "8.0B"
    quantization_level: str = "Q4_K_M"
    block_count: int = 32
    context_length: int = 131072
    embedding_length: int = 4096
    head_count: int = 32
    head_count_kv: int = 8
    capabilities: tuple[str, ...] = ("completion", "tools")
    gpu_tokens_per_s: float = 0.0  # 0: derived from the size
    num_ctx: int | None = None  # the Modelfile's `PARAMETER num_ctx`; None: not set

    @property
    def parameters(self) -> str:
        """/api/show `parameters`: the Modelfile's PARAMETER lines, name padded to 30."""
        return "" if self.num_ctx is None else f"{'num_ctx':<30} {self.num_ctx}"

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"sim-manifest:{self.name}".encode()).hexdigest()

    @property
    def is_embedding(self) -> bool:
        return "embedding" in self.capabilities

    @property
    def key_length(self) -> int:
        return self.embedding_length // max(1, self.head_count)

    @property
    def tokens_per_s_on_gpu(self) -> float:
        if self.gpu_tokens_per_s > 0:
            return self.gpu_tokens_per_s
        return GPU_BYTES_PER_S / max(1, self.size_bytes)

    def effective_ctx(self, num_ctx: int) -> int:
        return max(1, min(num_ctx, self.context_length))

    def kv_bytes(self, num_ctx: int, num_parallel: int) -> int:
        """The f16 KV cache for `num_ctx` (capped at the trained context) x the slots."""
        parallel = 1 if self.is_embedding else max(1, num_parallel)
        ctx = self.effective_ctx(num_ctx) * parallel
        return 2 * self.block_count * self.head_count_kv * self.key_length * 2 * ctx

    def runner_bytes(self, num_ctx: int, num_parallel: int) -> int:
        """Memory of a loaded runner: weights + f16 KV cache + compute graph (api-facts 1.5)."""
        graph = 128 * MIB + self.size_bytes // 20
        return self.size_bytes + self.kv_bytes(num_ctx, num_parallel) + graph

    def model_info(self) -> dict[str, Any]:
        arch = self.family
        return {
            "general.architecture": arch,
            "general.parameter_count": _parameter_count(self.parameter_size),
            "general.file_type": 15,
            "general.quantization_version": 2,
            f"{arch}.block_count": self.block_count,
            f"{arch}.context_length": self.context_length,
            f"{arch}.embedding_length": self.embedding_length,
            f"{arch}.attention.head_count": self.head_count,
            f"{arch}.attention.head_count_kv": self.head_count_kv,
            f"{arch}.attention.key_length": self.key_length,
            f"{arch}.attention.value_length": self.key_length,
        }

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


@dataclass(frozen=True)
class CheckpointSpec:
    """A ComfyUI checkpoint: weights to load and the work a default job does with them."""

    name: str
    size_bytes: int
    workspace_bytes: int = 1536 * MIB  # activations; stays in torch's cache after a job
    seconds: float = 4.0  # one job fully on GPU
    steps: int = 20


def _parameter_count(parameter_size: str) -> int:
    match = re.fullmatch(r"([0-9.]+)([KMB])", parameter_size)
    if not match:
        return 0
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}[match.group(2)]
    return int(float(match.group(1)) * scale)


DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("llama3.2:latest", 2_019_393_189, "llama", "3.2B", "Q4_K_M", 28, 131072, 3072, 24, 8),
    ModelSpec("llama3.1:8b", 4_920_753_328, "llama", "8.0B", "Q4_K_M", 32, 131072, 4096, 32, 8),
    ModelSpec("qwen2.5:14b", 8_988_124_069, "qwen2", "14.8B", "Q4_K_M", 48, 32768, 5120, 40, 8),
    ModelSpec("qwen2.5:32b", 19_851_336_256, "qwen2", "32.8B", "Q4_K_M", 64, 32768, 5120, 40, 8),
    ModelSpec(
        "nomic-embed-text:latest",
        274_302_450,
        "nomic-bert",
        "137M",
        "F16",
        12,
        2048,
        768,
        12,
        12,
        ("embedding",),
    ),
)

DEFAULT_CHECKPOINTS: tuple[CheckpointSpec, ...] = (
    CheckpointSpec("sd_xl_base_1.0.safetensors", 6_938_078_334, 1536 * MIB, 4.0, 20),
    CheckpointSpec("v1-5-pruned-emaonly-fp16.safetensors", 2_132_696_762, 768 * MIB, 1.5, 20),
    CheckpointSpec("flux1-dev-fp8.safetensors", 17_246_524_772, 2560 * MIB, 12.0, 20),
)


@dataclass(frozen=True)
class Catalog:
    models: tuple[ModelSpec, ...] = DEFAULT_MODELS
    checkpoints: tuple[CheckpointSpec, ...] = DEFAULT_CHECKPOINTS
    _by_name: dict[str, ModelSpec] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        self._by_name.update({normalize_model_name(m.name): m for m in self.models})

    def model(self, name: str) -> ModelSpec | None:
        return self._by_name.get(normalize_model_name(name))

    def checkpoint(self, name: str) -> CheckpointSpec | None:
        for ckpt in self.checkpoints:
            if ckpt.name == name:
                return ckpt
        return None

    @property
    def default_checkpoint(self) -> CheckpointSpec:
        return self.checkpoints[0]


def _from_dict(cls: type[Any], data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
    kwargs = dict(data)
    if "capabilities" in kwargs:
        kwargs["capabilities"] = tuple(kwargs["capabilities"])
    return cls(**kwargs)


def load_catalog(source: str | None) -> Catalog:
    """Parse `--catalog`: inline JSON (starting with "{") or a path to a JSON file."""
    if not source:
        return Catalog()
    text = source if source.lstrip().startswith("{") else Path(source).read_text()
    data = json.loads(text)
    models = tuple(
        _from_dict(ModelSpec, {**m, "name": normalize_model_name(m["name"])})
        for m in data.get("models", [])
    )
    checkpoints = tuple(_from_dict(CheckpointSpec, c) for c in data.get("checkpoints", []))
    return Catalog(models or DEFAULT_MODELS, checkpoints or DEFAULT_CHECKPOINTS)


def normalize_model_name(name: str) -> str:
    """Ollama's display name: default host and namespace dropped, `:latest` added."""
    name = name.strip().lower()
    for prefix in ("registry.ollama.ai/", "library/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        name += ":latest"
    return name


# --------------------------------------------------------------------------- keep_alive

FOREVER = math.inf

_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class DurationError(ValueError):
    pass


def parse_go_duration(text: str) -> float:
    """Seconds from a Go duration string ("5m", "1h30m", "-1m", "0"), as time.ParseDuration."""
    raw = text.strip()
    sign = -1.0 if raw.startswith("-") else 1.0
    body = raw.lstrip("+-")
    if body == "0":
        return 0.0
    if not body:
        raise DurationError(f'time: invalid duration "{text}"')
    pos, total = 0, 0.0
    while pos < len(body):
        match = _DURATION_PART.match(body, pos)
        if not match:
            if re.fullmatch(r"[0-9.]+", body[pos:]):
                raise DurationError(f'time: missing unit in duration "{text}"')
            raise DurationError(f'time: invalid duration "{text}"')
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    return sign * total


def parse_keep_alive(value: object) -> float | None:
    """Seconds to keep a model loaded; `FOREVER` for negative; None when not given.

    A JSON number is seconds and a string is a Go duration (api-facts 1.6). Raises
    DurationError (Ollama answers 400) for anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise DurationError("json: cannot unmarshal bool into keep_alive")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_go_duration(value)
    else:
        raise DurationError(f"json: cannot unmarshal {type(value).__name__} into keep_alive")
    return FOREVER if seconds < 0 else seconds


def parse_env_keep_alive(text: str) -> float:
    """OLLAMA_KEEP_ALIVE form: integer seconds or a Go duration."""
    try:
        seconds = float(int(text))
    except ValueError:
        seconds = parse_go_duration(text)
    return FOREVER if seconds < 0 else seconds
