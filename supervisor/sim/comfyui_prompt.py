"""What a ComfyUI prompt graph asks of the fake: checkpoint, duration, steps and outputs.

Real graphs are read for their loader (`CheckpointLoaderSimple.ckpt_name`, ...), sampler
`steps` and output nodes (`SaveImage`, ...). A sim-only node sets everything directly:

    {"class_type": "SimJob", "inputs": {"model_gib": 6, "workspace_gib": 1, "seconds": 3,
                                        "steps": 20, "ckpt_name": "my.safetensors"}}

An unknown checkpoint name gets the default checkpoint's size (real ComfyUI would reject it;
the sim stays lenient so tests can name what they like). Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from supervisor.sim.catalog import Catalog, CheckpointSpec
from supervisor.sim.gpu import GIB

_LOADERS = {
    "CheckpointLoaderSimple": "ckpt_name",
    "CheckpointLoader": "ckpt_name",
    "UNETLoader": "unet_name",
}
_SAMPLERS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"}
_OUTPUTS = {"SaveImage", "PreviewImage", "SimJob"}


def parse_prompt(
    catalog: Catalog, prompt: dict[str, Any]
) -> tuple[CheckpointSpec, float, int, list[str]]:
    """Checkpoint, simulated seconds, steps and output nodes of a prompt graph."""
    ckpt = catalog.default_checkpoint
    steps: int | None = None
    seconds: float | None = None
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict):
            continue
        kind = str(node.get("class_type", ""))
        inputs = node.get("inputs") or {}
        if kind in _LOADERS:
            name = str(inputs.get(_LOADERS[kind], ""))
            ckpt = catalog.checkpoint(name) or CheckpointSpec(name, ckpt.size_bytes)
        elif kind in _SAMPLERS and isinstance(inputs.get("steps"), int):
            steps = inputs["steps"]
        if kind == "SimJob":
            ckpt = _sim_job_checkpoint(catalog, inputs, ckpt)
            seconds = float(inputs.get("seconds", ckpt.seconds))
            steps = int(inputs.get("steps", steps or ckpt.steps))
        if kind in _OUTPUTS or kind.startswith("Save"):
            outputs.append(str(node_id))
    steps = steps or ckpt.steps
    if seconds is None:
        seconds = ckpt.seconds * steps / ckpt.steps
    return ckpt, seconds, steps, outputs


def _sim_job_checkpoint(
    catalog: Catalog, inputs: dict[str, Any], ckpt: CheckpointSpec
) -> CheckpointSpec:
    if "ckpt_name" in inputs:
        ckpt = catalog.checkpoint(str(inputs["ckpt_name"])) or ckpt
    size = inputs.get("model_bytes")
    if size is None and "model_gib" in inputs:
        size = int(float(inputs["model_gib"]) * GIB)
    work = inputs.get("workspace_bytes")
    if work is None and "workspace_gib" in inputs:
        work = int(float(inputs["workspace_gib"]) * GIB)
    if size is None and work is None:
        return ckpt
    name = str(inputs.get("ckpt_name", f"sim-{size or ckpt.size_bytes}.safetensors"))
    return CheckpointSpec(
        name,
        int(size if size is not None else ckpt.size_bytes),
        int(work if work is not None else ckpt.workspace_bytes),
        ckpt.seconds,
        ckpt.steps,
    )
