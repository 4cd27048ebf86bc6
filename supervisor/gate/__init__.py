"""The Ollama gate: a reverse proxy that makes room on the GPU before Ollama loads a model.

`Gate` is the proxy (core.py); `start_gate` builds one from the settings for cli.
"""

from supervisor.gate.core import Gate, GateStats
from supervisor.gate.start import start_gate

__all__ = ["Gate", "GateStats", "start_gate"]
