"""The Ollama gate: a reverse proxy that makes room on the GPU before Ollama loads a model.

`Gate` is the proxy (core.py); `start_gate` builds one from the settings for cli;
`GateStats` is the snapshot of its counters that `Gate.stats()` returns.
"""

from supervisor.gate.core import Gate
from supervisor.gate.start import start_gate
from supervisor.gate.stats import GateStats

__all__ = ["Gate", "GateStats", "start_gate"]
