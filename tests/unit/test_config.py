"""Every VRAM_* variable: its default, a valid value, and an invalid one whose error names
the variable, the value and what is accepted."""

from __future__ import annotations

import pytest

from supervisor.config import VARIABLES, Settings, load_settings
from supervisor.errors import ConfigError
from supervisor.model import LogFormat, Priority, ServiceSpec

# name -> (valid raw value, parsed value, invalid raw value)
CASES: dict[str, tuple[str, object, str]] = {
    "VRAM_CHECK_INTERVAL": ("2.5", 2.5, "0"),
    "VRAM_THRESHOLD": ("70", 70.0, "101"),
    "VRAM_AGGRESSIVE_THRESHOLD": ("90", 90.0, "abc"),
    "VRAM_MIN_FREE_INTERVAL": ("0", 0.0, "-1"),
    "VRAM_DEBUG": ("yes", True, "maybe"),
    "VRAM_LOG_FORMAT": ("JSON", LogFormat.JSON, "xml"),
    "VRAM_OLLAMA_URL": ("ollama:11434", "http://ollama:11434", "ftp://ollama"),
    "VRAM_COMFYUI_URL": ("http://127.0.0.1:8188/", "http://127.0.0.1:8188", "http://:99999"),
    "VRAM_SERVICES": (
        "llama-swap=127.0.0.1:8080, comfyui=http://127.0.0.1:8188",
        (("llama-swap", "http://127.0.0.1:8080"), ("comfyui", "http://127.0.0.1:8188")),
        "llama-swap:8080",
    ),
    "VRAM_PRIORITY": ("comfyui", Priority.COMFYUI, "gpu"),
    "VRAM_HEAL": ("off", False, "2"),
    "VRAM_HEAL_COOLDOWN": ("60", 60.0, "soon"),
    "VRAM_RESTART_FALLBACK": ("true", True, "sure"),
    "VRAM_RESTART_COOLDOWN": ("120", 120.0, "-5"),
    "VRAM_VERIFY_TIMEOUT": ("3", 3.0, "0"),
    "VRAM_REQUEST_TIMEOUT": ("1.5", 1.5, "-1"),
    "VRAM_DRY_RUN": ("1", True, "dry"),
    "VRAM_HTTP_PORT": ("0", None, "70000"),
    "VRAM_HTTP_HOST": ("127.0.0.1", "127.0.0.1", "a b"),
    "VRAM_GATE_PORT": ("11435", 11435, "port"),
    "VRAM_GATE_HOST": ("::", "::", "x/y"),
    "VRAM_GATE_WAIT": ("10", 10.0, "-1"),
    "VRAM_GATE_LOOP": ("Asyncio", "asyncio", "trio"),
    "VRAM_GATE_EXPRESS": ("off", False, "fast"),
    "VRAM_COMFYUI_GATE_PORT": ("8189", 8189, "port"),
    "VRAM_COMFYUI_MODELS": ("/comfyui-models", "/comfyui-models", "models"),
    "VRAM_MODEL_GATES": (
        "llama-swap=8081, llama-server=8082",
        (("llama-swap", 8081), ("llama-server", 8082)),
        "ollama=11435",  # Ollama's gate is VRAM_GATE_PORT
    ),
}

DEFAULTS = Settings()


def test_every_variable_has_a_case() -> None:
    assert {v.name for v in VARIABLES} == set(CASES)


def test_defaults() -> None:
    settings, warnings = load_settings({})
    assert settings == DEFAULTS and warnings == []
    assert settings.check_interval_s == 5.0 and settings.threshold_percent == 75.0
    assert settings.aggressive_threshold_percent == 85.0 and settings.min_free_interval_s == 30
    assert settings.http_port == 9105 and settings.gate_port is None
    assert settings.priority == Priority.BALANCED and settings.log_format is LogFormat.TEXT
    assert settings.heal and not settings.dry_run and not settings.restart_fallback
    assert settings.needs_docker


@pytest.mark.parametrize("var", VARIABLES, ids=lambda v: v.name)
def test_declared_default_parses_to_the_settings_default(var: object) -> None:
    name, field = var.name, var.field  # type: ignore[attr-defined]
    settings, _ = load_settings({name: var.default} if var.default else {})  # type: ignore[attr-defined]
    assert getattr(settings, field) == getattr(DEFAULTS, field)


@pytest.mark.parametrize("name", sorted(CASES))
def test_valid_value(name: str) -> None:
    raw, parsed, _ = CASES[name]
    env = {name: raw}
    if name == "VRAM_THRESHOLD":
        env["VRAM_AGGRESSIVE_THRESHOLD"] = "80"
    field = next(v.field for v in VARIABLES if v.name == name)
    settings, warnings = load_settings(env)
    assert getattr(settings, field) == parsed and warnings == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_invalid_value_names_variable_value_and_accepted(name: str) -> None:
    bad = CASES[name][2]
    with pytest.raises(ConfigError) as info:
        load_settings({name: bad})
    message = str(info.value)
    accepted = next(v.accepted for v in VARIABLES if v.name == name)
    assert name in message and repr(bad) in message and accepted in message
    assert info.value.name == name and info.value.value == bad


def test_empty_value_means_default() -> None:
    settings, _ = load_settings({"VRAM_THRESHOLD": "  ", "VRAM_OLLAMA_URL": ""})
    assert settings.threshold_percent == 75.0 and settings.ollama_url is None


def test_aggressive_below_threshold_is_rejected() -> None:
    with pytest.raises(ConfigError, match="VRAM_AGGRESSIVE_THRESHOLD"):
        load_settings({"VRAM_THRESHOLD": "80", "VRAM_AGGRESSIVE_THRESHOLD": "70"})


def test_unknown_vram_variable_warns_and_legacy_ones_are_silent() -> None:
    _, warnings = load_settings(
        {"VRAM_TRESHOLD": "80", "VRAM_OLLAMA_HOST": "x", "HOME": "/root", "OTHER_X": "1"}
    )
    assert len(warnings) == 1
    assert "VRAM_TRESHOLD" in warnings[0] and "did you mean VRAM_THRESHOLD?" in warnings[0]
    _, warnings = load_settings({"VRAM_COLOUR": "red"})
    assert "a typo?" in warnings[0] and "did you mean" not in warnings[0]


def test_fixed_urls_for_both_services_need_no_docker() -> None:
    settings, _ = load_settings({"VRAM_OLLAMA_URL": "http://o:1", "VRAM_COMFYUI_URL": "c:2"})
    assert not settings.needs_docker
    only_one, _ = load_settings({"VRAM_OLLAMA_URL": "http://o:1"})
    assert only_one.needs_docker


NUMERIC = [v.name for v in VARIABLES if v.accepted.startswith(("a number", "an integer"))]


@pytest.mark.parametrize("raw", ["inf", "-inf", "nan", "1e999", "Infinity"])
@pytest.mark.parametrize("name", NUMERIC)
def test_non_finite_numbers_are_rejected(name: str, raw: str) -> None:
    """`inf` would make a timeout or a wait endless (or overflow a lock's timeout)."""
    with pytest.raises(ConfigError) as info:
        load_settings({name: raw})
    assert info.value.name == name
    assert raw in str(info.value)


@pytest.mark.parametrize("raw", ["\u0661\u0662", "\uff11\uff12", "1\u0665"])
@pytest.mark.parametrize(
    "name", [*NUMERIC, "VRAM_HTTP_PORT", "VRAM_GATE_PORT", "VRAM_COMFYUI_GATE_PORT"]
)
def test_unicode_digits_are_not_numbers(name: str, raw: str) -> None:
    """int() and float() read Arabic-Indic or full-width digits; a setting must not."""
    with pytest.raises(ConfigError) as info:
        load_settings({name: raw})
    assert info.value.name == name


@pytest.mark.parametrize("raw", ["a" * 64, "a..b", "\udcff", "x" * 300 + ".example"])
@pytest.mark.parametrize("name", ["VRAM_HTTP_HOST", "VRAM_GATE_HOST"])
def test_host_names_that_cannot_be_encoded_are_refused(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: raw})
    assert info.value.name == name


@pytest.mark.parametrize(
    "raw, why",
    [
        (
            "llama-swap=http://127.0.0.1:8080,no-such-server=http://127.0.0.1:8000",
            "'no-such-server=http",
        ),
        ("comfyui=ftp://x", "bad URL in 'comfyui=ftp://x'"),
        ("comfyui=http://127.0.0.1:8188,,", "bad entry ''"),
    ],
)
def test_a_bad_services_entry_is_named(raw: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"VRAM_SERVICES": raw})
    message = str(info.value)
    assert "VRAM_SERVICES" in message and why in message
    assert "llama-server, llama-swap" in message  # the roles accepted


def test_services_may_repeat_a_role_and_need_no_docker() -> None:
    env = {
        "VRAM_SERVICES": "llama-server=http://127.0.0.1:8080,llama-server=http://127.0.0.1:8081",
        "VRAM_COMFYUI_URL": "http://127.0.0.1:8188",
    }
    settings, _ = load_settings(env)
    assert not settings.needs_docker
    assert settings.fixed_services == (
        ("comfyui", "http://127.0.0.1:8188"),
        ("llama-server", "http://127.0.0.1:8080"),
        ("llama-server", "http://127.0.0.1:8081"),
    )


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Balanced", "balanced"),
        ("llama-swap", "llama-swap"),
        ("comfyui, llama-swap ,ollama", "comfyui,llama-swap,ollama"),
    ],
)
def test_priority_takes_a_role_or_an_ordered_list(raw: str, normalised: str) -> None:
    settings, _ = load_settings({"VRAM_PRIORITY": raw})
    assert settings.priority == normalised


@pytest.mark.parametrize("raw", ["comfyui,comfyui", "balanced,ollama", "ollama,", "gpu"])
def test_a_bad_priority_names_the_roles(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"VRAM_PRIORITY": raw})
    assert "VRAM_PRIORITY" in str(info.value) and "llama-swap" in str(info.value)


def _spec(role: str, priority: int = 0) -> ServiceSpec:
    return ServiceSpec(role=role, name=role, url="http://127.0.0.1:1", priority=priority)


@pytest.mark.parametrize(
    "priority, a, b, outranks",
    [
        ("balanced", _spec("ollama"), _spec("comfyui"), False),
        ("balanced", _spec("comfyui"), _spec("ollama"), False),
        ("ollama", _spec("ollama"), _spec("comfyui"), True),
        ("ollama", _spec("comfyui"), _spec("ollama"), False),
        ("comfyui", _spec("comfyui"), _spec("llama-swap"), True),
        ("llama-swap,comfyui", _spec("comfyui"), _spec("ollama"), True),  # unlisted: lowest
        ("llama-swap,comfyui", _spec("llama-swap"), _spec("comfyui"), True),
        # the label breaks ties of the same role rank, never a VRAM_PRIORITY order
        ("balanced", _spec("ollama", 5), _spec("comfyui"), True),
        ("comfyui", _spec("ollama", 99), _spec("comfyui"), False),
        ("comfyui,ollama", _spec("ollama", 1), _spec("comfyui", 0), False),
    ],
)
def test_rank_for_n_tenants(priority: str, a: ServiceSpec, b: ServiceSpec, outranks: bool) -> None:
    assert Settings(priority=priority).outranks(a, b) is outranks


@pytest.mark.parametrize(
    "raw", ["llama-swap=0", "llama-swap=x", "llama-swap=8081,llama-swap=8082", "vllm2=1", "="]
)
def test_a_bad_model_gate_entry_is_named(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"VRAM_MODEL_GATES": raw})
    assert "VRAM_MODEL_GATES" in str(info.value) and "bad entry" in str(info.value)
