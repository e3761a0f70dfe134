"""Steering inside vLLM: the same :class:`~qscope_hf.steering.Steering` specs on an in-process ``vllm.LLM``, no fork.

Two ways in, one mechanism (:class:`EngineSteering`, forward hooks on the engine's decoder layers):

- ``with steered(llm, spec): llm.generate(...)`` steers every request generated inside the block;
- ``generate(llm, prompts, params, steering=..., steering_rows=[...])`` steers one call, each prompt with its own
  specs if asked (as ``model.generate(steering_rows=...)`` does for transformers).

vLLM runs every scheduled token of every request as one packed ``[N, d]`` batch (prompts being prefilled and one
token per request being decoded, no padding). What works on it: ``add``, ``clamp`` and ``gated`` modes (the last two
read each token's own activation), positions ``"all"``, ``"prompt"`` and ``"generated"`` (a token is a prompt token
when its position is below its request's prompt length, read from vLLM's batch), SAE features and vectors, several
specs and layers, ``relative=True`` strengths (each prompt's residual spread measured at its prefill, as for
transformers). Explicit position lists are refused. Decoder layers that return ``hidden_states`` or vLLM's
``(hidden_states, residual)`` pair (Llama, Qwen3, Qwen3-MoE and most others) are steered: the residual stream is
their sum, so an edit adds to ``hidden_states`` and reads the sum.

Never silently unsteered: an engine that compiles its model or replays CUDA graphs never calls Python hooks, so it
is refused unless created with ``enforce_eager=True``, and every block checks at its end that the hooks ran in
every forward. An engine whose model runs in another process (vLLM's default multiprocessing engine core, server
mode) is refused: create the ``LLM`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``. The prefix cache is emptied when a
block opens and closes, and :func:`generate` salts each steered prompt's cache, so no request reuses a prompt that
was computed with other steering.
"""

from .engine import TESTED_VLLM, check_engine
from .generate import generate
from .session import EngineSteering, steered

__all__ = ["TESTED_VLLM", "EngineSteering", "check_engine", "generate", "steered"]
