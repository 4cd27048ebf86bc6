"""vram-supervisor: keeps Ollama and ComfyUI sharing one GPU."""

__version__ = "0.1.0"
