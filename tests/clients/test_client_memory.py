"""Clients of many services at once do not each carry a TLS context.

The supervisor makes a client for every labelled container it discovers and closes it a
while after the container goes; with short-lived labelled containers coming and going
(the Docker-backed soak, docs/soak.md) dozens are alive at once. httpx builds a TLS context
with the whole CA bundle per client unless given one (about 1 MiB of native memory each,
kept by the allocator afterwards): the supervisor's RSS grew by tens of MiB. Measured in a
fresh interpreter, so that memory freed by other tests cannot hide the growth.
"""

from __future__ import annotations

import subprocess
import sys

from supervisor.clients._http import shared_tls

PROGRAM = """
import gc
from supervisor.clients.comfyui import ComfyClient
from supervisor.clients.ollama import OllamaClient

def rss_kib():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])

OllamaClient('http://127.0.0.1:9').close()  # imports and lazy set-up done
gc.collect()
before = rss_kib()
clients = [
    (OllamaClient if i % 2 else ComfyClient)(f'http://127.0.0.1:{10000 + i}')
    for i in range(60)
]
gc.collect()
print(rss_kib() - before)
"""


def test_sixty_live_clients_take_little_memory() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60, check=True
    )
    grew_mib = int(done.stdout.strip()) / 1024
    # With a TLS context each, 60 clients took about 55 MiB; sharing one, about 2.
    assert grew_mib < 15, f"60 live clients grew the RSS by {grew_mib:.1f} MiB"


def test_every_client_shares_the_one_tls_context() -> None:
    assert shared_tls() is shared_tls()
