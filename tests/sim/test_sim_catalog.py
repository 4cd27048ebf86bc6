"""Catalogue loading, Ollama name normalisation and keep_alive parsing (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.sim.catalog import (
    FOREVER,
    DurationError,
    load_catalog,
    normalize_model_name,
    parse_env_keep_alive,
    parse_keep_alive,
)
from supervisor.sim.gpu import GIB


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("llama3.2:3b", "llama3.2:3b"),
        ("library/llama3.2", "llama3.2:latest"),
        ("registry.ollama.ai/library/qwen2.5:14b", "qwen2.5:14b"),
        ("me/mymodel", "me/mymodel:latest"),
        ("host:5000/me/model", "host:5000/me/model:latest"),
        ("Llama3.2", "llama3.2:latest"),
    ],
)
def test_model_names_are_shown_with_a_tag(given: str, shown: str) -> None:
    assert normalize_model_name(given) == shown


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (0, 0.0),
        (30, 30.0),
        (1.5, 1.5),
        (-1, FOREVER),
        ("0", 0.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("-1m", FOREVER),
    ],
)
def test_keep_alive_numbers_are_seconds_and_strings_go_durations(
    value: object, seconds: float | None
) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["300", "5 minutes", "", True, [1]])
def test_keep_alive_rejects_what_ollama_rejects(value: object) -> None:
    with pytest.raises(DurationError):
        parse_keep_alive(value)


def test_env_keep_alive_also_takes_plain_seconds() -> None:
    assert parse_env_keep_alive("600") == 600.0
    assert parse_env_keep_alive("10m") == 600.0
    assert parse_env_keep_alive("-1") == FOREVER


def test_catalog_from_inline_json_or_a_file(tmp_path: Path) -> None:
    data = {
        "models": [{"name": "tiny", "size_bytes": GIB, "capabilities": ["completion"]}],
        "checkpoints": [{"name": "a.safetensors", "size_bytes": 2 * GIB, "seconds": 1.0}],
    }
    inline = load_catalog(json.dumps(data))
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(data))
    for catalog in (inline, load_catalog(str(path))):
        spec = catalog.model("tiny")
        assert spec is not None and spec.name == "tiny:latest"
        assert catalog.model("llama3.2") is None  # replaced, not merged
        assert catalog.default_checkpoint.name == "a.safetensors"
    with pytest.raises(ValueError, match="unknown ModelSpec field"):
        load_catalog('{"models": [{"name": "x", "size_bytes": 1, "vram": 2}]}')


def test_runner_memory_grows_with_context() -> None:
    spec = load_catalog(None).model("llama3.1:8b")
    assert spec is not None
    small, large = spec.runner_bytes(4096, 1), spec.runner_bytes(32768, 1)
    assert spec.size_bytes < small < large
    # f16 KV cache: 2 (K and V) x layers x kv heads x head dim x 2 bytes per token.
    assert large - small == 2 * 32 * 8 * 128 * 2 * (32768 - 4096)
