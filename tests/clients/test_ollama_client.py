"""OllamaClient against the simulator's fake Ollama (api-facts §1), and against canned
answers of odd, old or broken servers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from tenacity import RetryCallState

from supervisor.clients.ollama import OllamaClient, normalise_model_name
from supervisor.errors import ServiceError
from supervisor.model import OllamaModel
from supervisor.ports import ModelFacts, TaggedModel
from supervisor.sim.catalog import ModelSpec

URL = "http://ollama.test:11434"
GIB = 1024**3


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("llama3.2:3b", "llama3.2:3b"),
        ("llama3.2:", "llama3.2:latest"),
        ("  llama3.2  ", "llama3.2:latest"),
        ("library/llama3.2", "llama3.2:latest"),
        ("registry.ollama.ai/library/llama3.2:1b", "llama3.2:1b"),
        ("REGISTRY.OLLAMA.AI/Library/Llama3.2", "Llama3.2:latest"),
        ("https://registry.ollama.ai/library/llama3.2", "llama3.2:latest"),
        ("registry.ollama.ai/jmorgan/m", "jmorgan/m:latest"),
        ("jmorgan/m:q8", "jmorgan/m:q8"),
        ("hf.co/bartowski/Qwen3-8B-GGUF:Q4_K_M", "hf.co/bartowski/Qwen3-8B-GGUF:Q4_K_M"),
        ("hf.co/bartowski/Qwen3-8B-GGUF", "hf.co/bartowski/Qwen3-8B-GGUF:latest"),
        ("localhost:5000/team/model", "localhost:5000/team/model:latest"),
        ("localhost:5000/team/model:v2", "localhost:5000/team/model:v2"),
        ("", ""),
    ],
)
def test_names_are_normalised_the_way_ps_shows_them(given: str, shown: str) -> None:
    assert normalise_model_name(given) == shown
    assert normalise_model_name(shown) == shown  # idempotent


# --------------------------------------------------------------------------- reads


def test_version(fake_ollama: Any, ollama_client: Any) -> None:
    assert ollama_client(fake_ollama).version() == "0.12.5"


def test_base_url_loses_its_trailing_slash(fake_ollama: Any, ollama_client: Any) -> None:
    client = ollama_client(fake_ollama, base_url=URL + "/")
    assert client.base_url == URL
    assert client.version() == "0.12.5"


def test_ps_lists_loaded_models(fake_ollama: Any, ollama_client: Any) -> None:
    client = ollama_client(fake_ollama)
    # Another process holds all but 4 GiB: qwen3:8b (~6.8 GiB at 8192) goes partly to the
    # CPU. Once it is gone, llama3.2 (~2.7 GiB) fits beside it.
    fake_ollama.gpu.allocate("outsider", 1, fake_ollama.gpu.free_bytes() - 4 * GIB)
    client.preload("qwen3:8b", timeout_s=30)
    fake_ollama.gpu.release("outsider")
    client.preload("llama3.2", timeout_s=30)
    raw = {m["name"]: m for m in httpx.get(f"{fake_ollama.url}/api/ps").json()["models"]}
    models = {m.name: m for m in client.ps()}
    assert set(models) == {"llama3.2:latest", "qwen3:8b"}
    for name, model in models.items():
        entry = raw[name]
        assert model == OllamaModel(
            name=name,
            size_bytes=entry["size"],
            size_vram_bytes=entry["size_vram"],
            digest=fake_ollama.spec(name).digest,
            context_length=entry["context_length"],
            expires_at=entry["expires_at"],
        )
    # The context each runner got: the server's default, and the Modelfile's num_ctx.
    assert (models["llama3.2:latest"].context_length, models["qwen3:8b"].context_length) == (
        4096,
        8192,
    )
    assert not models["llama3.2:latest"].is_spilled
    assert models["qwen3:8b"].is_spilled
    assert 0 < models["qwen3:8b"].size_vram_bytes < models["qwen3:8b"].size_bytes


def test_ps_with_nothing_loaded(fake_ollama: Any, ollama_client: Any) -> None:
    assert ollama_client(fake_ollama).ps() == ()


def test_ps_on_old_builds_without_context_length(sim_ollama: Any, ollama_client: Any) -> None:
    old = sim_ollama(version="0.9.6")  # v0.9.6 and older have no context_length (api-facts 1.2)
    client = ollama_client(old)
    client.preload("llama3.2", timeout_s=30)
    (model,) = client.ps()
    assert "context_length" not in httpx.get(f"{old.url}/api/ps").json()["models"][0]
    assert model.context_length is None
    assert model.size_vram_bytes == model.size_bytes == old.loaded["llama3.2:latest"][1]


@pytest.mark.parametrize(
    "entry",
    [
        {"model": "m:latest", "size": 10, "size_vram": 10},  # no "name": use "model"
        {"name": "m", "size": 10, "size_vram": 10},  # untagged: shown with :latest
        {"name": "m:latest", "size": 10, "size_vram": 10, "context_length": "4096"},
        {"name": "m:latest", "size": 10, "size_vram": 10, "digest": None, "expires_at": 5},
    ],
)
def test_ps_tolerates_odd_optional_fields(ollama_client: Any, entry: dict[str, Any]) -> None:
    client = ollama_client(lambda r: httpx.Response(200, json={"models": [entry]}))
    assert client.ps() == (OllamaModel(name="m:latest", size_bytes=10, size_vram_bytes=10),)


def test_ps_null_models_is_empty(ollama_client: Any) -> None:
    # Go encodes a nil slice as null.
    assert ollama_client(lambda r: httpx.Response(200, json={"models": None})).ps() == ()


def test_tags_lists_installed_models_with_disk_size(fake_ollama: Any, ollama_client: Any) -> None:
    assert ollama_client(fake_ollama).tags() == (
        TaggedModel("llama3.2:latest", 2019393189),
        TaggedModel("qwen3:8b", 5225376047),
    )
    assert fake_ollama.loaded == {}  # listing loads nothing


def test_show_reads_arch_keys_and_num_ctx(fake_ollama: Any, ollama_client: Any) -> None:
    facts = ollama_client(fake_ollama).show("qwen3:8b")
    assert facts == ModelFacts(
        name="qwen3:8b",
        context_length=40960,
        block_count=36,
        embedding_length=4096,
        head_count=32,
        head_count_kv=8,
        key_length=128,
        value_length=128,
        num_ctx=8192,  # from the Modelfile's PARAMETER line in `parameters`
    )
    assert fake_ollama.requests[-1] == (
        "POST",
        "/api/show",
        {"model": "qwen3:8b", "verbose": False},
    )


def test_show_without_num_ctx_parameter(fake_ollama: Any, ollama_client: Any) -> None:
    facts = ollama_client(fake_ollama).show("llama3.2")
    assert facts.name == "llama3.2:latest"
    assert facts.num_ctx is None
    assert facts.block_count == 28


def test_show_uses_the_reported_architecture(sim_ollama: Any, ollama_client: Any) -> None:
    gemma = ModelSpec("gemma3:4b", 3338801804, family="gemma3", block_count=34)
    sim = sim_ollama(models=(gemma,))
    # The keys are "gemma3.block_count" etc.: read under the reported architecture.
    assert (
        "gemma3.block_count"
        in httpx.post(f"{sim.url}/api/show", json={"model": "gemma3:4b"}).json()["model_info"]
    )
    assert ollama_client(sim).show("gemma3:4b").block_count == 34


def test_show_per_layer_arrays_and_missing_model_info(ollama_client: Any) -> None:
    body = {
        "parameters": "num_ctx 2048\nnum_ctx 16384",
        "model_info": {
            "general.architecture": "gemma3n",
            "gemma3n.attention.head_count_kv": [2, 2, 4, 2],
            "gemma3n.attention.head_count": [],  # emptied: longer than 5 without verbose
            "gemma3n.block_count": 30,
        },
    }
    facts = ollama_client(lambda r: httpx.Response(200, json=body)).show("gemma3n")
    assert (facts.head_count_kv, facts.head_count, facts.block_count) == (4, None, 30)
    assert facts.num_ctx == 16384  # the last PARAMETER line wins
    bare = ollama_client(lambda r: httpx.Response(200, json={"details": {}})).show("x")
    assert bare == ModelFacts(name="x:latest")


def test_show_of_a_model_that_is_not_installed(fake_ollama: Any, ollama_client: Any) -> None:
    with pytest.raises(
        ServiceError,
        match=r"model 'nope:latest' is not installed \(HTTP 404: model 'nope:latest' not found\)",
    ):
        ollama_client(fake_ollama).show("nope")


# --------------------------------------------------------------------------- unload / preload


def test_unload_sends_keep_alive_zero_and_the_model_leaves_ps(
    fake_ollama: Any, ollama_client: Any
) -> None:
    client = ollama_client(fake_ollama)
    client.preload("llama3.2", timeout_s=30)
    client.unload("llama3.2")
    assert fake_ollama.requests[-1] == (
        "POST",
        "/api/generate",
        {"model": "llama3.2:latest", "keep_alive": 0},
    )
    assert client.ps() == ()


def test_unloading_a_model_that_is_not_loaded_is_fine(fake_ollama: Any, ollama_client: Any) -> None:
    ollama_client(fake_ollama).unload("qwen3:8b")  # done_reason "unload", a no-op
    assert fake_ollama.loaded == {}


def test_unloading_a_model_that_is_not_installed(fake_ollama: Any, ollama_client: Any) -> None:
    with pytest.raises(
        ServiceError,
        match=r"^ollama at http://ollama.test:11434: model 'ghost:latest' is not installed",
    ):
        ollama_client(fake_ollama).unload("ghost")


def test_preload_loads_the_model_with_stream_false(fake_ollama: Any, ollama_client: Any) -> None:
    client = ollama_client(fake_ollama)
    client.preload("qwen3:8b", timeout_s=300)
    assert fake_ollama.requests[-1] == (
        "POST",
        "/api/generate",
        {"model": "qwen3:8b", "stream": False},
    )
    assert [m.name for m in client.ps()] == ["qwen3:8b"]


@pytest.mark.parametrize("keep_alive", [-1, "30m", 300])
def test_preload_sends_keep_alive_only_when_given(
    fake_ollama: Any, ollama_client: Any, keep_alive: int | str
) -> None:
    """With keep_alive the load keeps the model's keep-alive (a model loaded with -1 stays
    forever) and replaces a loaded model's, which withdraws a pending unload (api-facts
    1.6/1.7); without it the server's default applies, as before."""
    client = ollama_client(fake_ollama)
    client.preload("qwen3:8b", timeout_s=300, keep_alive=keep_alive)
    assert fake_ollama.requests[-1] == (
        "POST",
        "/api/generate",
        {"model": "qwen3:8b", "stream": False, "keep_alive": keep_alive},
    )
    client.preload("qwen3:8b", 300)  # positional, as before: no keep_alive field
    assert "keep_alive" not in fake_ollama.requests[-1][2]


def test_preload_uses_the_long_read_timeout(ollama_client: Any) -> None:
    seen: list[dict[str, float | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json={"model": "m:latest", "done": True, "done_reason": "load"})

    client = ollama_client(handler, timeout_s=5)
    client.preload("m", timeout_s=600)
    client.unload("m")
    assert seen[0]["read"] == 600 and seen[0]["connect"] == 5
    assert seen[1]["read"] == 5


def test_preload_of_a_model_that_is_not_installed(fake_ollama: Any, ollama_client: Any) -> None:
    with pytest.raises(ServiceError, match="model 'ghost:latest' is not installed"):
        ollama_client(fake_ollama).preload("ghost", timeout_s=10)


def test_preload_error_in_a_200_body_is_an_error(ollama_client: Any) -> None:
    client = ollama_client(
        lambda r: httpx.Response(200, json={"error": "llama runner process has terminated"})
    )
    with pytest.raises(ServiceError, match="llama runner process has terminated"):
        client.preload("m", timeout_s=10)


# --------------------------------------------------------------------------- failures


def _raise(exc_type: type[httpx.TransportError]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return handler


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (
            lambda r: httpx.Response(500, json={"error": "model list cache unavailable"}),
            r"GET /api/ps returned HTTP 500: model list cache unavailable",
        ),
        (
            lambda r: httpx.Response(
                503,
                json={"error": "server busy, please try again.  maximum pending requests exceeded"},
            ),
            r"HTTP 503: server busy",
        ),
        (
            lambda r: httpx.Response(502, text="<html>\n<b>Bad Gateway</b>\n</html>"),
            r"HTTP 502: <html> <b>Bad Gateway</b> </html>$",
        ),
        (
            lambda r: httpx.Response(200, text="Ollama is running"),
            r"GET /api/ps returned a body that is not JSON: 'Ollama is running'",
        ),
        (
            lambda r: httpx.Response(200, json=[]),
            r"unexpected shape: the body is a list, expected an object",
        ),
        (lambda r: httpx.Response(200, json={}), r"unexpected shape: the body has no 'models'"),
        (
            lambda r: httpx.Response(200, json={"models": {}}),
            r"models is an object, expected a list",
        ),
        (
            lambda r: httpx.Response(200, json={"models": [{"name": "m", "size": 1}]}),
            r"models\[0\] has no 'size_vram'",
        ),
        (
            lambda r: httpx.Response(
                200, json={"models": [{"name": "m", "size": "1", "size_vram": 1}]}
            ),
            r"models\[0\].size is a string, expected an integer",
        ),
        (
            lambda r: httpx.Response(
                200, json={"models": [{"name": "m", "size": True, "size_vram": 1}]}
            ),
            r"models\[0\].size is a boolean",
        ),
        (
            lambda r: httpx.Response(200, json={"models": [{"size": 1, "size_vram": 1}]}),
            r"models\[0\] has no 'name'",
        ),
        (_raise(httpx.ReadTimeout), r"GET /api/ps timed out after 5 s \(ReadTimeout\)"),
        (_raise(httpx.ConnectError), r"GET /api/ps: cannot connect \(simulated\)"),
        (_raise(httpx.RemoteProtocolError), r"GET /api/ps failed: RemoteProtocolError: simulated"),
    ],
)
def test_every_failure_is_a_service_error_naming_the_server(
    ollama_client: Any, handler: Any, message: str
) -> None:
    with pytest.raises(ServiceError, match=message) as caught:
        ollama_client(handler).ps()
    assert caught.value.service == f"ollama at {URL}"
    assert str(caught.value).startswith(f"ollama at {URL}: ")
    assert caught.value.__cause__ is not None or "HTTP" in str(caught.value)


def test_version_wrong_shape(ollama_client: Any) -> None:
    with pytest.raises(ServiceError, match="version is an integer, expected a string"):
        ollama_client(lambda r: httpx.Response(200, json={"version": 12})).version()


def test_the_cause_is_kept(ollama_client: Any) -> None:
    with pytest.raises(ServiceError) as caught:
        ollama_client(_raise(httpx.ConnectError)).version()
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    with pytest.raises(ServiceError) as caught:
        ollama_client(lambda r: httpx.Response(200, text="{")).version()
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize(
    "error", [httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError]
)
def test_reads_are_retried_once(
    fake_ollama: Any, ollama_client: Any, flaky: Any, error: Any
) -> None:
    handler = flaky(fake_ollama, error)
    assert ollama_client(handler).version() == "0.12.5"
    assert handler.calls == 2


def test_reads_give_up_after_the_attempts(fake_ollama: Any, ollama_client: Any, flaky: Any) -> None:
    handler = flaky(fake_ollama, httpx.ConnectError, httpx.ConnectError, httpx.ConnectError)
    with pytest.raises(ServiceError, match="cannot connect"):
        ollama_client(handler).tags()
    assert handler.calls == 2
    handler = flaky(fake_ollama, httpx.ConnectError, httpx.ConnectError)
    assert ollama_client(handler, attempts=3).tags()
    assert handler.calls == 3


def test_http_errors_are_not_retried(ollama_client: Any) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(500, json={"error": "boom"})

    with pytest.raises(ServiceError, match="HTTP 500: boom"):
        ollama_client(handler).ps()
    assert len(calls) == 1


def test_unload_is_idempotent_so_it_is_retried(
    fake_ollama: Any, ollama_client: Any, flaky: Any
) -> None:
    handler = flaky(fake_ollama, httpx.ReadTimeout)
    ollama_client(handler).unload("llama3.2")
    assert handler.calls == 2


def test_a_delivered_preload_is_never_repeated(
    fake_ollama: Any, ollama_client: Any, flaky: Any
) -> None:
    handler = flaky(fake_ollama, httpx.ReadTimeout)
    with pytest.raises(ServiceError, match=r"POST /api/generate timed out after 30 s"):
        ollama_client(handler).preload("qwen3:8b", timeout_s=30)
    assert handler.calls == 1
    assert fake_ollama.loaded == {}


def test_a_preload_that_could_not_connect_is_retried(
    fake_ollama: Any, ollama_client: Any, flaky: Any
) -> None:
    handler = flaky(fake_ollama, httpx.ConnectError)
    ollama_client(handler).preload("qwen3:8b", timeout_s=30)
    assert handler.calls == 2
    assert "qwen3:8b" in fake_ollama.loaded


def test_the_injected_wait_is_used(fake_ollama: Any, ollama_client: Any, flaky: Any) -> None:
    waited: list[int] = []

    def wait(state: RetryCallState) -> float:
        waited.append(state.attempt_number)
        return 0.0

    client = ollama_client(
        flaky(fake_ollama, httpx.ConnectError, httpx.ConnectError), retry_wait=wait, attempts=3
    )
    client.version()
    assert waited == [1, 2]


def test_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="attempts"):
        OllamaClient(URL, attempts=0)
