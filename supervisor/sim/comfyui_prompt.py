"""What a ComfyUI prompt graph asks of the fake: checkpoint, nodes to run, outputs, errors.

Real graphs are read for their loader (`CheckpointLoaderSimple.ckpt_name`, ...), sampler
`steps`, `EmptyLatentImage.batch_size` and output nodes (`SaveImage`, ...). A sim-only node
sets everything directly:

    {"class_type": "SimJob", "inputs": {"model_gib": 6, "workspace_gib": 1, "seconds": 3,
                                        "steps": 20, "ckpt_name": "my.safetensors"}}

Validation follows the real server (api-facts-2026 section 4): a node class it does not
know is `invalid_prompt`; an input value out of range is `prompt_outputs_failed_validation`
with the errors per node, and the prompt is never queued. Inputs that are missing are not
checked (the sim stays lenient so tests can write short graphs), and an unknown checkpoint
name gets the default checkpoint's size (real ComfyUI would reject it). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
# Node classes of a stock install the sim accepts (they take no simulated time).
_OTHERS = {
    "CLIPTextEncode",
    "CLIPLoader",
    "DualCLIPLoader",
    "VAELoader",
    "VAEDecode",
    "VAEEncode",
    "EmptyLatentImage",
    "EmptySD3LatentImage",
    "LoadImage",
    "LoraLoader",
    "ConditioningCombine",
    "LatentUpscale",
    "ImageScale",
}
KNOWN_CLASSES = frozenset(_LOADERS) | _SAMPLERS | _OUTPUTS | _OTHERS
# Integer inputs with ComfyUI's bounds: (minimum, maximum).
_INT_BOUNDS = {"steps": (1, 10000), "batch_size": (1, 4096)}
_SIM_NUMBERS = ("model_gib", "workspace_gib", "model_bytes", "workspace_bytes", "seconds")


@dataclass(frozen=True)
class PlanNode:
    """One node the worker runs, in order. `steps` > 0: a sampler, which checks for an
    interrupt at each step (the progress hook); 0: it runs to its end once started."""

    node_id: str
    class_type: str
    seconds: float = 0.0  # simulated, at full GPU speed (a sampler's are spread over steps)
    steps: int = 0
    loads: bool = False  # the checkpoint is loaded while this node runs


@dataclass(frozen=True)
class Plan:
    checkpoint: CheckpointSpec
    seconds: float
    steps: int
    outputs: list[str]
    nodes: list[PlanNode]
    batch_size: int = 1
    prefixes: dict[str, str] = field(default_factory=dict)  # output node -> filename prefix


class PromptError(Exception):
    """A prompt the real server answers 400 to: `body` is its JSON answer."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["type"])
        self.body = body


def error_body(
    kind: str, message: str, details: str = "", node_errors: Any = None
) -> dict[str, Any]:
    return {
        "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
        "node_errors": [] if node_errors is None else node_errors,
    }


def validate(prompt: dict[str, Any]) -> None:
    """Raise PromptError as `validate_prompt` would; return when the prompt may be queued."""
    for node_id, node in prompt.items():
        kind = node.get("class_type") if isinstance(node, dict) else None
        if not isinstance(kind, str):
            raise PromptError(
                error_body(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
            )
        if kind not in KNOWN_CLASSES:
            raise PromptError(
                error_body(
                    "invalid_prompt",
                    f"Cannot execute because node {kind} does not exist.",
                    f"Node ID '#{node_id}'",
                )
            )
    outputs = _outputs(prompt)
    if not outputs:
        raise PromptError(error_body("prompt_no_outputs", "Prompt has no outputs"))
    node_errors: dict[str, Any] = {}
    for node_id, node in prompt.items():
        reasons = _input_errors(node)
        if reasons:
            node_errors[str(node_id)] = {
                "errors": reasons,
                "dependent_outputs": outputs,
                "class_type": node["class_type"],
            }
    if node_errors:
        details = "; ".join(
            f"{r['message']}: {r['details']}" for e in node_errors.values() for r in e["errors"]
        )
        raise PromptError(
            error_body(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
                details,
                node_errors,
            )
        )


def _input_errors(node: dict[str, Any]) -> list[dict[str, Any]]:
    inputs = node.get("inputs") or {}
    reasons: list[dict[str, Any]] = []
    if not isinstance(inputs, dict):
        return reasons
    for name, (low, high) in _INT_BOUNDS.items():
        if name not in inputs or isinstance(inputs[name], list):  # a list links a node
            continue
        value = inputs[name]
        if not isinstance(value, int) or isinstance(value, bool):
            reasons.append(
                _reason("invalid_input_type", "Failed to convert an input value", name, value)
            )
        elif value < low:
            reasons.append(
                _reason(
                    "value_smaller_than_min",
                    f"Value {value} smaller than min of {low}",
                    name,
                    value,
                )
            )
        elif value > high:
            reasons.append(
                _reason(
                    "value_bigger_than_max", f"Value {value} bigger than max of {high}", name, value
                )
            )
    if node.get("class_type") == "SimJob":
        for name in _SIM_NUMBERS:
            value = inputs.get(name)
            if value is None:
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                reasons.append(_reason("invalid_input_type", "Expected a number >= 0", name, value))
    return reasons


def _reason(kind: str, message: str, name: str, value: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "message": message,
        "details": f"{name}, {value!r}",
        "extra_info": {"input_name": name, "received_value": value},
    }


def _outputs(prompt: dict[str, Any]) -> list[str]:
    return [
        str(node_id)
        for node_id, node in prompt.items()
        if isinstance(node, dict)
        and (
            node.get("class_type") in _OUTPUTS or str(node.get("class_type", "")).startswith("Save")
        )
    ]


def parse_prompt(catalog: Catalog, prompt: dict[str, Any]) -> Plan:
    """The plan of a prompt that passed `validate`: checkpoint, timing, nodes, outputs."""
    ckpt = catalog.default_checkpoint
    steps: int | None = None
    seconds: float | None = None
    batch = 1
    prefixes: dict[str, str] = {}
    loaders: list[tuple[str, str]] = []
    samplers: list[tuple[str, str]] = []
    others: list[tuple[str, str]] = []
    sim_jobs: list[str] = []
    for node_id, node in prompt.items():
        node_id = str(node_id)
        kind = str(node.get("class_type", ""))
        inputs = node.get("inputs") or {}
        if kind in _LOADERS:
            name = str(inputs.get(_LOADERS[kind], ""))
            ckpt = catalog.checkpoint(name) or CheckpointSpec(name, ckpt.size_bytes)
            loaders.append((node_id, kind))
        elif kind in _SAMPLERS:
            if isinstance(inputs.get("steps"), int):
                steps = inputs["steps"]
            samplers.append((node_id, kind))
        elif kind == "SimJob":
            ckpt = _sim_job_checkpoint(catalog, inputs, ckpt)
            seconds = float(inputs.get("seconds", ckpt.seconds))
            steps = int(inputs.get("steps", steps or ckpt.steps))
            if isinstance(inputs.get("batch_size"), int):
                batch = inputs["batch_size"]
            sim_jobs.append(node_id)
        else:
            if kind == "EmptyLatentImage" and isinstance(inputs.get("batch_size"), int):
                batch = inputs["batch_size"]
            others.append((node_id, kind))
        if kind in _OUTPUTS or kind.startswith("Save"):
            prefix = inputs.get("filename_prefix", "ComfyUI")
            prefixes[node_id] = prefix if isinstance(prefix, str) and prefix else "ComfyUI"
    steps = steps or ckpt.steps
    if seconds is None:
        seconds = ckpt.seconds * steps / ckpt.steps
    # Execution order: loaders, then the sampler, then everything downstream (outputs last).
    nodes: list[PlanNode] = []
    if sim_jobs:
        nodes.append(PlanNode(sim_jobs[0], "SimJob", seconds, steps, loads=True))
        nodes.extend(PlanNode(n, "SimJob") for n in sim_jobs[1:])
    else:
        nodes.extend(PlanNode(n, k) for n, k in loaders)
        pre = [(n, k) for n, k in others if k not in _OUTPUTS and not k.startswith("Save")]
        nodes.extend(PlanNode(n, k) for n, k in pre if k not in ("VAEDecode",))
        for i, (n, k) in enumerate(samplers):
            nodes.append(PlanNode(n, k, seconds if i == 0 else 0.0, steps if i == 0 else 1))
        nodes.extend(PlanNode(n, k) for n, k in pre if k == "VAEDecode")
        nodes.extend(PlanNode(n, k) for n, k in others if k in _OUTPUTS or k.startswith("Save"))
        # The model is loaded by the first loader; a graph without one (a sim shortcut)
        # loads it in its first node all the same.
        if nodes:
            nodes[0] = replace(nodes[0], loads=True)
    return Plan(ckpt, seconds, steps, _outputs(prompt), nodes, batch, prefixes)


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
