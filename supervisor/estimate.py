"""How much VRAM an Ollama model will need before it loads (pure: no I/O, no clock).

The gate calls this for a request whose model is not resident, to tell the RoomMaker how
much room to make. Policy: prefer what Ollama measured over what we predict, and err on
the high side. Overestimating costs ComfyUI a free it did not strictly need; underestimating
costs a model that spills to the CPU and runs 3-8x slower until it is reloaded
(landscape.md). Nothing here is exact; the figure is a target, not a promise.

The estimate, in order of preference:

1. **Seen** (`basis="seen"`). Ollama's `/api/ps` `size` (RAM + VRAM of the runner) from an
   earlier load of the same model, when the request does not pin a different `num_ctx`.
   It includes everything Ollama really allocated: weights, KV cache, compute graph and
   projector, at the context Ollama chose (which on new builds depends on the GPU's size,
   api-facts gotcha 7, so a measured figure beats our default).
2. **Seen, KV adjusted** (`basis="seen+kv"`). The request pins a `num_ctx` other than the one
   seen: `seen size - KV(seen ctx) + KV(requested ctx)` (the seen size as is when
   /api/show gives no KV facts).
3. **Formula** (`basis="formula"`), api-facts §1.5:

       need     = weights + kv + overhead
       weights  = /api/tags size (on-disk GGUF bytes, projector layers included)
       kv       = block_count x ctx x num_parallel
                  x head_count_kv x (key_length + value_length) x kv_bytes_per_element
       overhead = overhead_fixed_bytes + overhead_fraction x (weights + kv)

   with `key_length` defaulting to `embedding_length / head_count`, `value_length` to
   `key_length`, `head_count_kv` to `head_count` (no grouped-query attention), and
   `ctx = request options.num_ctx, else Modelfile num_ctx, else default_num_ctx`, capped at
   the model's trained `context_length` as Ollama does. `default_num_ctx` is what the
   Ollama in use picks (ollama_profile.py: 4096 before 0.15.5, then by total VRAM, or
   `OLLAMA_CONTEXT_LENGTH`). f16 KV (2 bytes per element) is
   Ollama's default; `OLLAMA_KV_CACHE_TYPE=q8_0` is about 1.06 and `q4_0` about 0.56.
   The overhead stands for the compute graph (output logits scale with vocabulary x batch),
   the CUDA context and allocator slack; 512 MiB + 10 % matches the gap between tags size
   + KV and the ps size of small llama-family models. For Ollama >= 0.30 it is at least
   the batch surcharge Ollama itself predicts (`batch_bytes`: 768 MiB, 2 GiB above 32768
   tokens; ollama_profile.py). Sliding-window and MLA
   architectures store less KV than this formula says: an overestimate, on purpose.
   Without usable `/api/show` facts the KV term is 0 (the overhead still applies).

Without a seen size or a tags size (model not installed, Ollama unreachable) there is no
estimate (`None`): the gate then forwards without making room and Ollama answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from supervisor.ports import ModelFacts

MIB = 1024**2

Basis = Literal["seen", "seen+kv", "formula"]


@dataclass(frozen=True)
class EstimateParams:
    """The assumptions of the formula; defaults match a stock Ollama (f16 KV, 1 slot)."""

    default_num_ctx: int = 4096  # ollama_profile.py gives the Ollama in use's
    num_parallel: int = 1  # OLLAMA_NUM_PARALLEL: the KV cache holds num_ctx x this
    kv_bytes_per_element: float = 2.0  # f16
    overhead_fixed_bytes: int = 512 * MIB
    overhead_fraction: float = 0.10
    batch_bytes: int = 0  # Ollama >= 0.30's batch surcharge: the least the overhead is


@dataclass(frozen=True)
class SeenSize:
    """What /api/ps reported for a model the last time it was resident."""

    size_bytes: int
    context_length: int | None = None


@dataclass(frozen=True)
class Estimate:
    need_bytes: int
    basis: Basis
    num_ctx: int | None  # the context the estimate assumes (None: unknown)
    weights_bytes: int | None = None  # formula only
    kv_bytes: int | None = None  # formula, or the KV difference for seen+kv
    overhead_bytes: int = 0  # formula only


def effective_num_ctx(
    request_num_ctx: int | None, facts: ModelFacts | None, params: EstimateParams
) -> int:
    """The context Ollama will load with: request, else Modelfile, else the default;
    capped at the trained context when the model reports one."""
    ctx = request_num_ctx or (facts.num_ctx if facts else None) or params.default_num_ctx
    trained = facts.context_length if facts else None
    return min(ctx, trained) if trained else ctx


def kv_cache_bytes(facts: ModelFacts, num_ctx: int, params: EstimateParams) -> int | None:
    """K and V for every layer, `num_ctx x num_parallel` tokens; None when /api/show
    lacks what the formula needs."""
    heads = facts.head_count
    key_length = facts.key_length
    if key_length is None and facts.embedding_length and heads:
        key_length = facts.embedding_length // heads
    value_length = facts.value_length or key_length
    heads_kv = facts.head_count_kv or heads
    if not facts.block_count or not key_length or not value_length or not heads_kv:
        return None
    elements = (
        facts.block_count
        * num_ctx
        * max(params.num_parallel, 1)
        * heads_kv
        * (key_length + value_length)
    )
    return round(elements * params.kv_bytes_per_element)


def uses_seen_as_is(seen: SeenSize | None, request_num_ctx: int | None) -> bool:
    """The seen size applies unchanged: the request does not pin another context.

    The gate skips /api/show and /api/tags then."""
    return seen is not None and (
        request_num_ctx is None
        or seen.context_length is None
        or seen.context_length == request_num_ctx
    )


def estimate_need(
    *,
    weights_bytes: int | None,
    facts: ModelFacts | None,
    request_num_ctx: int | None,
    seen: SeenSize | None,
    params: EstimateParams | None = None,
) -> Estimate | None:
    """The VRAM a load will take (see the module docstring for the order and formula)."""
    params = params or EstimateParams()
    if seen is not None:
        if uses_seen_as_is(seen, request_num_ctx):
            return Estimate(seen.size_bytes, "seen", seen.context_length or request_num_ctx)
        # The request pins a context other than the seen one (both known here).
        assert request_num_ctx is not None and seen.context_length is not None
        new_ctx = effective_num_ctx(request_num_ctx, facts, params)
        if facts is not None:
            old_kv = kv_cache_bytes(facts, seen.context_length, params)
            new_kv = kv_cache_bytes(facts, new_ctx, params)
            if old_kv is not None and new_kv is not None:
                need = max(seen.size_bytes - old_kv + new_kv, 0)
                return Estimate(need, "seen+kv", new_ctx, kv_bytes=new_kv - old_kv)
        # No KV facts to rescale with: the measured size is still the best figure we have.
        return Estimate(seen.size_bytes, "seen", seen.context_length)
    if weights_bytes is None or weights_bytes <= 0:
        return None
    ctx = effective_num_ctx(request_num_ctx, facts, params)
    kv = (kv_cache_bytes(facts, ctx, params) if facts is not None else None) or 0
    overhead = params.overhead_fixed_bytes + round(params.overhead_fraction * (weights_bytes + kv))
    overhead = max(overhead, params.batch_bytes)
    return Estimate(
        need_bytes=weights_bytes + kv + overhead,
        basis="formula",
        num_ctx=ctx,
        weights_bytes=weights_bytes,
        kv_bytes=kv,
        overhead_bytes=overhead,
    )
