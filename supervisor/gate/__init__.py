"""The gates: reverse proxies that make room on the GPU before Ollama loads a model (`Gate`)
and before ComfyUI runs a job (`ComfyGate`, the image gate).

`Gate` is the proxy (core.py); `start_gate` builds one from the settings for cli;
`GateStats` is the snapshot of its counters that `Gate.stats()` returns.
"""

from supervisor.gate.comfy import ComfyGate, ComfyGateStats
from supervisor.gate.core import Gate
from supervisor.gate.start import start_comfy_gate, start_gate
from supervisor.gate.stats import GateStats

__all__ = ["ComfyGate", "ComfyGateStats", "Gate", "GateStats", "start_comfy_gate", "start_gate"]
