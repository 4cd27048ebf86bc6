"""Which requests can make Ollama load a model, and what their bodies ask for (pure).

api-facts §1.7 lists the endpoints; all take the model in a `model` field (JSON, or a
multipart form field for audio transcriptions). A request the gate cannot read (not
JSON, no model) is not gated: it is forwarded and Ollama answers it as it would directly.
Two kinds of load-endpoint request load nothing and are never gated: the unload form of
generate/chat (`keep_alive` 0 with no prompt or messages, §1.6) and `num_gpu: 0`, which
runs on the CPU only (§1.8).

The gate parses load bodies on its event loop, so it bounds what it parses: a body with
more than `json_values` commas, objects and arrays (counted at C speed before parsing) is
refused with 413, and one nested too deeply for the parser with 400. A model name with
control characters or over MAX_MODEL_NAME characters is no Ollama model: such a request
is forwarded ungated (Ollama refuses it), and the name never reaches the log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from supervisor.clients.ollama import normalise_model_name
from supervisor.gate.http11 import Refused

LOAD_PATHS = frozenset(
    {
        b"/api/generate",
        b"/api/chat",
        b"/api/embed",
        b"/api/embeddings",
        b"/v1/chat/completions",
        b"/v1/completions",
        b"/v1/embeddings",
        b"/v1/responses",
        b"/v1/messages",
        b"/v1/audio/transcriptions",
    }
)
# The endpoints whose empty request with keep_alive 0 unloads instead of loading.
_UNLOAD_FIELD = {b"/api/generate": "prompt", b"/api/chat": "messages"}
_GO_DURATION = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_BOUNDARY = re.compile(rb'boundary="?([^";,]+)"?', re.IGNORECASE)
_MODEL_PART = re.compile(rb'\bname="model"', re.IGNORECASE)
MAX_MODEL_NAME = 256
DEFAULT_JSON_VALUES = 500_000


@dataclass(frozen=True)
class LoadRequest:
    model: str  # normalised name:tag, as /api/ps shows it
    num_ctx: int | None = None  # options.num_ctx when the request pins it
    is_unload: bool = False
    is_cpu_only: bool = False

    @property
    def needs_room(self) -> bool:
        return not self.is_unload and not self.is_cpu_only


def parse_load_request(
    path: bytes,
    content_type: bytes | None,
    body: bytes,
    json_values: int = DEFAULT_JSON_VALUES,
    normalise: Callable[[str], str] = normalise_model_name,
) -> LoadRequest | None:
    """The load a request to a load endpoint asks for; None when the body names no model
    (or none Ollama could have). Refused (413, 400) for a body too big or too deep to
    parse. `normalise`: how the server names models (Ollama's name:tag by default; the
    other kinds use the name as sent)."""
    if content_type is not None and content_type.lower().startswith(b"multipart/form-data"):
        model = _multipart_field(body, content_type)
        if model is None or not _is_model_name(model):
            return None
        return LoadRequest(normalise(model))
    values = body.count(b",") + body.count(b"{") + body.count(b"[")
    if values > json_values:
        limit = f"{json_values} values (commas, objects and arrays)"
        raise Refused(413, f"a load request's JSON body is limited to {limit}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    except RecursionError:
        raise Refused(400, "the JSON body is nested too deeply") from None
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    if not isinstance(model, str) or not _is_model_name(model):
        return None
    options = data.get("options")
    options = options if isinstance(options, dict) else {}
    unload_field = _UNLOAD_FIELD.get(path)
    return LoadRequest(
        model=normalise(model),
        num_ctx=_positive_int(options.get("num_ctx")),
        is_unload=unload_field is not None
        and not data.get(unload_field)
        and _is_zero_duration(data.get("keep_alive")),
        is_cpu_only=_is_int(options.get("num_gpu")) and options["num_gpu"] == 0,
    )


def _is_model_name(model: str) -> bool:
    return bool(model.strip()) and len(model) <= MAX_MODEL_NAME and model.isprintable()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> int | None:
    if _is_int(value) and value > 0:
        return int(value)
    # Ollama decodes options loosely; a float like 8192.0 still means 8192.
    if isinstance(value, float) and value.is_integer() and value > 0:
        return int(value)
    return None


def _is_zero_duration(value: Any) -> bool:
    """Ollama's keep_alive is zero: a number of seconds truncated to 0 (0, 0.5), or a Go
    duration string that is zero ("0", "0s", "0m0s"). Missing or null is not zero."""
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int | float):
        return 0 <= value < 1
    if isinstance(value, str):
        text = value.strip()
        if text in ("0", "+0", "-0"):
            return True
        return bool(_GO_DURATION.fullmatch(text)) and not re.search(r"[1-9]", text)
    return False


def _multipart_field(body: bytes, content_type: bytes) -> str | None:
    found = _BOUNDARY.search(content_type)
    if not found:
        return None
    for part in body.split(b"--" + found.group(1)):
        head, sep, value = part.partition(b"\r\n\r\n")
        if sep and _MODEL_PART.search(head):
            value = value[:-2] if value.endswith(b"\r\n") else value
            try:
                return value.decode().strip() or None
            except UnicodeDecodeError:
                return None
    return None
