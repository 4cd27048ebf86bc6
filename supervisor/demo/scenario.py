"""The demo's script: three steps on the simulated host, then a summary.

Every sentence with a figure in it is built from a reading taken at that moment (Ollama's
/api/ps, the simulated GPU, ComfyUI's history, the supervisor's snapshot and log). When the
supervisor does not do what a step needs within its deadline, the step raises
`DemoFailure` with what was expected and what was seen; nothing is claimed in advance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from supervisor.clients.ollama import OllamaClient
from supervisor.demo.console import Console, SupervisorLog, gib, percent
from supervisor.demo.world import CHECK_INTERVAL_S, DemoFailure, Placement, World
from supervisor.demo.world import loaded_fresh as _loaded_fresh
from supervisor.demo.world import tokens_per_s as _tokens_per_s
from supervisor.errors import ServiceError
from supervisor.estimate import estimate_need
from supervisor.ollama_profile import ollama_profile

# The image model ComfyUI renders with. 2026: Flux (16 GiB of weights); beside SDXL's 6.5 GiB,
# the big model below would still fit once llama-server keeps its 1 GiB free, and nothing
# would spill for step 3 to heal.
CHECKPOINTS = {
    "2026": ("flux1-dev-fp8.safetensors", "Flux"),
    "2025": ("sd_xl_base_1.0.safetensors", "SDXL"),
}


def checkpoint(profile: str) -> str:
    return CHECKPOINTS[profile][0]


# A model that fits the 24 GiB card alone but not beside ComfyUI's checkpoint, at the
# default context of each simulated generation (2026: 32768 tokens on 24 GiB, where
# qwen2.5:32b would need 28 GiB and never fit).
BIG_MODELS = {"2026": "qwen2.5:14b", "2025": "qwen2.5:32b"}


def big_model(profile: str) -> str:
    return BIG_MODELS[profile]


REACTION_DEADLINE_S = 20.0  # how long a step waits for the supervisor before it fails
BAR_WIDTH = 40


@dataclass
class Story:
    """What happened, step by step, for the summary."""

    results: list[tuple[str, str, bool]] = field(default_factory=list)
    speeds: dict[str, float] = field(default_factory=dict)

    def add(self, what: str, result: str, ok: bool = True) -> None:
        self.results.append((what, result, ok))


class Scenario:
    def __init__(self, world: World, console: Console, log: SupervisorLog) -> None:
        self.w = world
        self.c = console
        self.log = log
        self.story = Story()
        self.big = big_model(world.host.profile)
        self.checkpoint, self.image_kind = CHECKPOINTS[world.host.profile]

    # ------------------------------------------------------------------ helpers

    def show_gpu(self, title: str = "GPU now") -> None:
        g = self.w.gpu()
        used_cells = round(BAR_WIDTH * g.used / g.total) if g.total else 0
        bar = "#" * used_cells + "." * (BAR_WIDTH - used_cells)
        used = percent(g.used, g.total)
        self.c.line(f"  {title}: [{bar}] {gib(g.used)} of {gib(g.total)} in use ({used}%)")
        self.c.line(f"      ComfyUI holds {gib(g.comfyui):>9}   Ollama holds {gib(g.ollama):>9}")

    def placement(self, model: str) -> Placement:
        found = self.w.ps().get(model)
        if found is None:
            raise DemoFailure(f"{model} is not in Ollama's /api/ps")
        return found

    def describe(self, p: Placement) -> str:
        text = f"{gib(p.size_vram)} of {gib(p.size)} on the GPU = {p.percent}%"
        if p.percent < 100:
            text += f", the other {gib(p.size - p.size_vram)} on the CPU"
        return text

    def check(self, ok: bool, good: str, bad: str) -> None:
        if not ok:
            raise DemoFailure(bad)
        self.c.line("  " + self.c.green("OK ") + good)

    # ------------------------------------------------------------------ steps

    def step1_render(self) -> None:
        self.c.heading("Step 1 of 3: ComfyUI renders an image")
        self.c.say(
            f"Someone queues a 20-step {self.image_kind} image in ComfyUI "
            f"({self.checkpoint}). ComfyUI loads the checkpoint onto the GPU and renders."
        )
        image, took = self.w.render(self.checkpoint)
        g = self.w.gpu()
        self.c.say(
            f"Done in {took:.1f} s: {image}. ComfyUI keeps the checkpoint in VRAM afterwards "
            "(its 'smart memory': the next image starts faster), so the card stays "
            f"{percent(g.used, g.total)}% full while nobody draws anything."
        )
        self.show_gpu()
        self.w.wait_next_pass()
        seen = self.w.supervisor_view()
        gpus = seen.get("gpus") or []
        if gpus:
            source = {
                "api": "from the services' own APIs: ComfyUI's /system_stats, Ollama's /api/ps",
                "nvml": "from NVML",
            }.get(str(seen.get("vram_source")), f"source: {seen.get('vram_source')}")
            acted = len(seen.get("recent_actions") or [])
            self.c.say(
                f"The supervisor sees the same: {gpus[0]['used_percent']:.0f}% in use ({source})."
                + (
                    " Nobody needs room yet, so it has done nothing."
                    if not acted
                    else f" It has acted {acted} time(s) so far."
                )
            )
        if g.comfyui < 2 * 1024**3:
            raise DemoFailure(f"ComfyUI holds only {gib(g.comfyui)} after the render")
        self.story.add(
            "ComfyUI rendered an image and kept its checkpoint in VRAM", f"{gib(g.comfyui)} held"
        )

    def _need(self, model: str) -> int | None:
        """The supervisor's own estimate (the gate's formula) of a model's VRAM need."""
        try:
            with OllamaClient(self.w.host.ollama_url) as ollama:
                tagged = {t.name: t.size_bytes for t in ollama.tags()}
                facts = ollama.show(model)
                version = ollama.version()
        except ServiceError:
            return None
        params = ollama_profile(version, {}, self.w.gpu().total).params
        estimate = estimate_need(
            weights_bytes=tagged.get(model),
            facts=facts,
            request_num_ctx=None,
            seen=None,
            params=params,
        )
        return estimate.need_bytes if estimate else None

    def step2_gate(self) -> None:
        self.c.heading("Step 2 of 3: a chat needs a model that does not fit next to it")
        g = self.w.gpu()
        need = self._need(self.big)
        self.c.say(
            f"A chat app asks Ollama for {self.big}. The supervisor estimates it needs about "
            f"{gib(need)}; only {gib(g.free)} of the {gib(g.total)} are free."
        )
        if need is not None and need > g.free:
            cpu_share = percent(need - g.free, need)
            self.c.say(
                f"Without the supervisor: Ollama decides the GPU/CPU split once, when it loads, "
                f"from the VRAM free at that moment. About {cpu_share}% of the model would "
                "land on the CPU and stay there as long as the model is loaded, and every "
                "answer would be several times slower. (Step 3 shows it happening.)"
            )
        self.c.say(
            "With the supervisor: the chat app talks to the supervisor's Ollama gate "
            f"({self.w.gate_url}) instead of Ollama itself. Before forwarding a load, the gate "
            "makes room, then checks the VRAM really came back:"
        )
        mark = self.log.mark()
        answer = self.w.chat(self.w.gate_url, self.big)
        p = self.placement(self.big)
        freed = self.log.matches(r"Freed ComfyUI memory \((\w+)\)", mark)
        speed = _tokens_per_s(answer)
        if speed is not None:
            self.story.speeds["full"] = speed
        self.c.say(
            f"The answer came back ({answer.get('eval_count')} tokens at "
            f"{speed or 0:.1f} tokens/s, simulated). Ollama's /api/ps now says "
            f"{self.big}: {self.describe(p)}."
        )
        self.show_gpu()
        self.check(
            p.percent == 100 and bool(freed),
            f"{self.big} is fully on the GPU: ComfyUI's memory was freed before the load.",
            f"{self.big} is {p.percent}% on the GPU"
            + ("" if freed else " and the supervisor freed nothing before the load")
            + "; the gate did not make room in time.",
        )
        self.story.add(
            f"A chat needed {self.big}; the gate freed ComfyUI before the load", "100% on GPU"
        )

    def step3_heal(self) -> None:
        self.c.heading("Step 3 of 3: a model that already spilled to the CPU is healed")
        self.c.say(
            f"The chat is over and its app unloads {self.big}. Then ComfyUI gets another "
            "image job and keeps its checkpoint on the GPU again."
        )
        self.w.unload(self.big)
        image, took = self.w.render(self.checkpoint)
        self.c.say(f"Rendered {image} in {took:.1f} s.")
        self.show_gpu()
        self.c.say(
            f"Now a script that talks to Ollama directly (not through the gate, so nobody "
            f"makes room) loads {self.big} again:"
        )
        mark = self.log.mark()
        self.w.load(self.w.host.ollama_url, self.big)
        spilled = self.placement(self.big)
        self.c.say(f"Ollama's /api/ps says {self.big}: {self.describe(spilled)}.")
        if spilled.percent >= 100:
            raise DemoFailure(
                f"{self.big} did not spill (ComfyUI held too little?); nothing to heal"
            )
        answer = self.w.chat(self.w.host.ollama_url, self.big)
        slow = _tokens_per_s(answer)
        if slow is not None and not _loaded_fresh(answer):
            self.story.speeds["spilled"] = slow
            full = self.story.speeds.get("full")
            self.c.say(
                f"A chat to it ran at {slow:.1f} tokens/s (simulated)"
                + (
                    f", {full / slow:.1f}x slower than fully on the GPU in step 2"
                    if full and slow
                    else ""
                )
                + ". Ollama never moves those layers back by itself."
            )
        self.c.say(
            f"The supervisor looks every {CHECK_INTERVAL_S:g} s. It should notice the spill, "
            "free ComfyUI (which is idle), unload the model and load it again:"
        )
        healed = self.log.wait_for(
            rf"Healed Ollama model {self.big}: (\d+)% -> (\d+)% on GPU", mark,
            REACTION_DEADLINE_S,
        )  # fmt: skip
        if healed is None:
            problems = self.log.problems(mark)
            raise DemoFailure(
                f"the supervisor did not heal {self.big} within {REACTION_DEADLINE_S:g} s"
                + (f" (it said: {problems[-1]})" if problems else "")
            )
        after = self.placement(self.big)
        answer = self.w.chat(self.w.host.ollama_url, self.big)
        fast = _tokens_per_s(answer)
        self.c.say(f"Ollama's /api/ps now says {self.big}: {self.describe(after)}.")
        if fast is not None:
            self.story.speeds["healed"] = fast
            self.c.say(f"The same chat now runs at {fast:.1f} tokens/s (simulated).")
        self.show_gpu()
        self.check(
            after.percent == 100,
            f"{self.big} healed: {spilled.percent}% -> {after.percent}% on the GPU.",
            f"the supervisor logged a heal but /api/ps says {after.percent}% on the GPU",
        )
        self.story.add(
            "A model loaded around the gate spilled; the supervisor healed it",
            f"{spilled.percent}% -> {after.percent}% on GPU",
        )

    # ------------------------------------------------------------------ summary

    def summary(self, elapsed_s: float, failure: str | None) -> None:
        c = self.c
        c.heading("Summary")
        for i, (what, result, ok) in enumerate(self.story.results, 1):
            c.line(f"  {i}. {what:<68} {c.green(result) if ok else c.red(result)}")
        if failure is not None:
            c.line(f"  {len(self.story.results) + 1}. " + c.red(f"FAILED: {failure}"))
        c.line()
        frees = self.log.matches(r"Freed ComfyUI memory \((\w+)\): (.+?) -> (.+?) in ")
        by_stage: dict[str, int] = {}
        for m in frees:
            by_stage[m.group(1)] = by_stage.get(m.group(1), 0) + 1
        stages = ", ".join(f"{n} {stage}" for stage, n in sorted(by_stage.items())) or "none"
        c.line(f"  ComfyUI frees, by stage:  {stages} (each verified by reading VRAM afterwards)")
        heals = self.log.matches(r"Healed Ollama model (\S+): (\d+)% -> (\d+)% on GPU")
        heal_text = ", ".join(f"{m.group(1)} {m.group(2)}% -> {m.group(3)}%" for m in heals)
        c.line(f"  Heals:                    {len(heals)}" + (f" ({heal_text})" if heals else ""))
        if {"spilled", "healed"} <= self.story.speeds.keys():
            c.line(
                f"  Chat speed ({self.big}): {self.story.speeds['spilled']:.1f} tokens/s "
                f"spilled -> {self.story.speeds['healed']:.1f} tokens/s healed (simulated)"
            )
        try:
            models = self.w.ps()
            g = self.w.gpu()
        except DemoFailure as exc:
            c.line(f"  Final placement:          unknown ({exc})")
        else:
            c.line("  Final placement:")
            for p in models.values():
                c.line(f"      Ollama  {p.name:<28} {self.describe(p)}")
            if not models:
                c.line("      Ollama  (no model loaded)")
            c.line(f"      ComfyUI {'(its CUDA context and cache)':<28} {gib(g.comfyui)}")
            c.line(f"      GPU     {'in use':<28} {gib(g.used)} of {gib(g.total)}")
        problems = self.log.problems()
        if problems:
            c.line(f"  Supervisor warnings:      {len(problems)} (shown above)")
        c.line(f"  Elapsed:                  {elapsed_s:.1f} s")
        c.line()
        if failure is None:
            c.line(
                "  "
                + c.green(c.bold("Demo passed."))
                + " The supervisor above is the real one (same code as `vram-supervisor run`);"
            )
            c.line("  only the GPU, Ollama and ComfyUI were simulated.")
        else:
            c.line("  " + c.red(c.bold("Demo FAILED: ")) + failure)


def run_steps(scenario: Scenario) -> None:
    scenario.step1_render()
    scenario.step2_gate()
    scenario.step3_heal()
