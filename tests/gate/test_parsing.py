"""The gate's pure parts: which requests load what (load_request.py), the HTTP/1.1
framing it relays (http11.py) and upstream URLs (relay.Origin), table by table."""

from __future__ import annotations

import json

import h11
import pytest

from supervisor.gate.http11 import Refused, quoted, request_path
from supervisor.gate.load_request import LoadRequest, parse_load_request
from supervisor.gate.relay import Origin


def _json(**body: object) -> bytes:
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (b"/api/generate", _json(model="llama3.2", prompt="x"), LoadRequest("llama3.2:latest")),
        (b"/api/generate", _json(model="qwen3:8b"), LoadRequest("qwen3:8b")),  # preload
        (
            b"/api/generate",
            _json(model="registry.ollama.ai/library/llama3.2:1b"),
            LoadRequest("llama3.2:1b"),
        ),
        (b"/api/chat", _json(model="me/mine", messages=[]), LoadRequest("me/mine:latest")),
        (
            b"/api/generate",
            _json(model="m", prompt="x", options={"num_ctx": 8192}),
            LoadRequest("m:latest", num_ctx=8192),
        ),
        (
            b"/api/generate",
            _json(model="m", options={"num_ctx": 8192.0}),
            LoadRequest("m:latest", num_ctx=8192),
        ),
        (b"/api/generate", _json(model="m", options={"num_ctx": -1}), LoadRequest("m:latest")),
        (b"/api/generate", _json(model="m", options={"num_ctx": "8k"}), LoadRequest("m:latest")),
        (b"/api/generate", _json(model="m", options=None), LoadRequest("m:latest")),
        (
            b"/api/generate",
            _json(model="m", options={"num_gpu": 0}),
            LoadRequest("m:latest", is_cpu_only=True),
        ),
        (b"/api/generate", _json(model="m", options={"num_gpu": 10}), LoadRequest("m:latest")),
        # Unloads: keep_alive zero and nothing to generate.
        (b"/api/generate", _json(model="m", keep_alive=0), LoadRequest("m:latest", is_unload=True)),
        (
            b"/api/generate",
            _json(model="m", prompt="", keep_alive="0s"),
            LoadRequest("m:latest", is_unload=True),
        ),
        (
            b"/api/generate",
            _json(model="m", keep_alive=0.5),  # Ollama truncates seconds to whole ones
            LoadRequest("m:latest", is_unload=True),
        ),
        (
            b"/api/chat",
            _json(model="m", messages=[], keep_alive="0m0s"),
            LoadRequest("m:latest", is_unload=True),
        ),
        (b"/api/generate", _json(model="m", keep_alive="5m"), LoadRequest("m:latest")),
        (b"/api/generate", _json(model="m", keep_alive=-1), LoadRequest("m:latest")),
        (b"/api/generate", _json(model="m", keep_alive="10"), LoadRequest("m:latest")),
        (b"/api/generate", _json(model="m", prompt="x", keep_alive=0), LoadRequest("m:latest")),
        (
            b"/api/chat",
            _json(model="m", messages=[{"role": "user"}], keep_alive=0),
            LoadRequest("m:latest"),
        ),
        (b"/api/embed", _json(model="m", input=[], keep_alive=0), LoadRequest("m:latest")),
        # OpenAI-compatible bodies.
        (
            b"/v1/chat/completions",
            _json(model="gpt-oss:20b", messages=[]),
            LoadRequest("gpt-oss:20b"),
        ),
        (
            b"/v1/embeddings",
            _json(model="nomic-embed-text", input="x"),
            LoadRequest("nomic-embed-text:latest"),
        ),
        # Nothing to gate.
        (b"/api/generate", b"not json", None),
        (b"/api/generate", b"[1, 2]", None),
        (b"/api/generate", _json(prompt="x"), None),
        (b"/api/generate", _json(model=""), None),
        (b"/api/generate", _json(model=7), None),
        (b"/api/generate", b"\xff\xfe", None),
    ],
)
def test_parse_load_request(path: bytes, body: bytes, expected: LoadRequest | None) -> None:
    assert parse_load_request(path, b"application/json", body) == expected


def test_multipart_model_field() -> None:
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        b'RIFF\r\n--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        b"whisper\r\n--XyZ--\r\n"
    )
    ctype = b"multipart/form-data; boundary=XyZ"

    assert parse_load_request(b"/v1/audio/transcriptions", ctype, body) == LoadRequest(
        "whisper:latest"
    )
    assert parse_load_request(b"/v1/audio/transcriptions", b"multipart/form-data", body) is None


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/api/tags", b"/api/tags"),
        (b"/echo?x=1", b"/echo?x=1"),
        (b"http://evil.example/api/generate", b"/api/generate"),
        (b"HTTP://evil.example:80/api/chat?x=1", b"/api/chat?x=1"),
        (b"http://evil.example", b"/"),
        (b"http://evil.example?x=1", b"/?x=1"),
    ],
)
def test_request_path_serves_origin_and_absolute_form_by_path(target: bytes, path: bytes) -> None:
    req = h11.Request(method=b"POST", target=target, headers=[(b"Host", b"x")])
    assert request_path(req) == path


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        (b"CONNECT", b"evil.example:443", 501),
        (b"OPTIONS", b"*", 400),
        (b"GET", b"evil.example:80", 400),
        (b"GET", b"ftp://evil.example/x", 400),
    ],
)
def test_request_path_refuses_what_a_forward_proxy_would_serve(
    method: bytes, target: bytes, status: int
) -> None:
    req = h11.Request(method=method, target=target, headers=[(b"Host", b"x")])
    with pytest.raises(Refused) as refused:
        request_path(req)
    assert refused.value.status == status


def test_quoted_escapes_and_truncates_client_strings() -> None:
    assert quoted("llama3\n2026-01-01 | INFO | forged") == repr(
        "llama3\n2026-01-01 | INFO | forged"
    )
    assert "\n" not in quoted("a\nb") and "\r" not in quoted("a\rb")
    long = quoted("x" * 1_000_000)
    assert len(long) < 200 and long.endswith("(1000000 chars)")
    assert quoted(b"\x1b[31mred") == repr("\x1b[31mred")


def test_load_bodies_too_complex_or_too_deep_are_refused_not_parsed() -> None:
    many = b"[" + b"{}," * 600_000 + b"{}]"
    with pytest.raises(Refused) as refused:
        parse_load_request(b"/api/generate", None, many)
    assert refused.value.status == 413

    deep = b'{"model": "llama3.2", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(Refused) as refused:
        parse_load_request(b"/api/generate", None, deep, json_values=10**6)
    assert refused.value.status == 400

    # Commas inside a long prompt count too, but a realistic one passes.
    prose = json.dumps({"model": "llama3.2", "prompt": "a, b, c. " * 100_000}).encode()
    assert parse_load_request(b"/api/generate", None, prose) == LoadRequest("llama3.2:latest")


@pytest.mark.parametrize("model", ["llama3.2\n2026 | INFO | forged", "x" * 300, "a\x1bb", " "])
def test_implausible_model_names_are_not_gated(model: str) -> None:
    body = json.dumps({"model": model, "prompt": "x"}).encode()
    assert parse_load_request(b"/api/generate", None, body) is None


@pytest.mark.parametrize(
    ("url", "host", "port", "host_header", "base_path"),
    [
        ("http://127.0.0.1:11434", "127.0.0.1", 11434, b"127.0.0.1:11434", b""),
        ("http://ollama:11434/", "ollama", 11434, b"ollama:11434", b""),
        ("127.0.0.1:11434", "127.0.0.1", 11434, b"127.0.0.1:11434", b""),
        ("http://[::1]:11434", "::1", 11434, b"[::1]:11434", b""),
        ("http://host/ollama/", "host", 80, b"host", b"/ollama"),
        ("https://host", "host", 443, b"host", b""),
    ],
)
def test_origin_parse(url: str, host: str, port: int, host_header: bytes, base_path: bytes) -> None:
    origin = Origin.parse(url)
    assert (origin.host, origin.port, origin.host_header, origin.base_path) == (
        host,
        port,
        host_header,
        base_path,
    )


@pytest.mark.parametrize("url", ["ftp://host", "http://", ""])
def test_origin_parse_refuses_non_http(url: str) -> None:
    with pytest.raises(ValueError):
        Origin.parse(url)


def test_the_private_h11_api_the_gate_relies_on_is_there() -> None:
    """The relay builds events with h11's private `_parsed=True` (no second validation) and
    reads `h11._headers.Headers`; pyproject pins h11 to the series that has them. A newer
    h11 without them must fail here, not on every request through the gate."""
    request = h11.Request(
        method=b"GET", target=b"/api/ps", headers=[(b"Host", b"127.0.0.1")], _parsed=True
    )
    response = h11.Response(status_code=200, headers=[], reason=b"OK", _parsed=True)
    assert isinstance(request.headers, h11._headers.Headers)
    assert list(request.headers) == [(b"host", b"127.0.0.1")]
    assert response.status_code == 200
    client = h11.Connection(h11.CLIENT)
    assert client.send(request).startswith(b"GET /api/ps HTTP/1.1\r\n")
