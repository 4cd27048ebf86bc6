"""The gate's pure parts: which requests load what (load_request.py), the HTTP/1.1
framing it relays (http11.py) and upstream URLs (relay.Origin), table by table."""

from __future__ import annotations

import json

import pytest

from supervisor.gate.http11 import ChunkScanner, Framing, parse_response_head
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
    "pieces",
    [
        [b"5\r\nhello\r\n0\r\n\r\n"],
        [b"5\r\nhel", b"lo\r\n0\r\n\r\n"],
        [b"5", b"\r", b"\nhello", b"\r", b"\n0\r\n", b"\r\n"],
        [b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n"],
        [b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"],
        [b"A\r\nhello worl\r\n0\r\n\r\n"[:5], b"A\r\nhello worl\r\n0\r\n\r\n"[5:]],
    ],
)
def test_chunk_scanner_finds_the_end_and_the_payload(pieces: list[bytes]) -> None:
    scanner = ChunkScanner()
    payload: list[bytes] = []
    for piece in pieces:
        assert not scanner.is_done
        assert scanner.feed(piece, payload) == len(piece)
    assert scanner.is_done
    assert b"".join(payload) in (b"hello", b"hello worl")


def test_chunk_scanner_stops_at_the_message_end() -> None:
    scanner = ChunkScanner()
    data = b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK"
    assert scanner.feed(data) == data.index(b"HTTP")
    assert scanner.is_done


@pytest.mark.parametrize("bad", [b"zz\r\n", b"0x5\r\nhello", b"3\r\nabcX\r\n", b"1_0\r\n"])
def test_chunk_scanner_refuses_broken_framing(bad: bytes) -> None:
    with pytest.raises(ValueError):
        ChunkScanner().feed(bad)


@pytest.mark.parametrize(
    ("head", "method", "framing", "length", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", b"GET", Framing.LENGTH, 12, True),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST",
            Framing.CHUNKED,
            0,
            True,
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", b"HEAD", Framing.NONE, 0, True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"DELETE", Framing.NONE, 0, True),
        (b"HTTP/1.1 304 Not Modified\r\n\r\n", b"GET", Framing.NONE, 0, True),
        (b"HTTP/1.1 200 OK\r\n\r\n", b"GET", Framing.CLOSE, 0, False),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
            b"GET",
            Framing.LENGTH,
            2,
            False,
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", b"GET", Framing.LENGTH, 2, False),
    ],
)
def test_parse_response_head(
    head: bytes, method: bytes, framing: Framing, length: int, keep_alive: bool
) -> None:
    resp = parse_response_head(head, method)
    assert (resp.framing, resp.content_length, resp.keep_alive) == (framing, length, keep_alive)


@pytest.mark.parametrize(
    "head",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    ],
)
def test_parse_response_head_refuses_what_it_cannot_frame(head: bytes) -> None:
    with pytest.raises(ValueError):
        parse_response_head(head, b"GET")


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
