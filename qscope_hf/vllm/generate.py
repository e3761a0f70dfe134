"""The per-call form: :func:`generate` runs one ``llm.generate`` with steering for every prompt and/or per prompt."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from ..errors import ArgumentTypeError, ConfigError
from ..steering import RowSpecs, Steering, check_rows, steering_list
from .engine import EXTRA_ARGS_KEY, import_vllm
from .session import EngineSteering


def _prompt_dicts(prompts: Any) -> list[dict]:
    """``prompts`` (a string, or a list of strings / vLLM prompt dicts) as a list of new prompt dicts."""
    items = [prompts] if isinstance(prompts, (str, dict)) else prompts
    if not isinstance(items, Sequence):
        raise ArgumentTypeError(f"prompts must be a string, a vLLM prompt dict or a list of them, got "
                                f"{type(prompts).__name__}")
    dicts = []
    for item in items:
        if isinstance(item, str):
            dicts.append({"prompt": item})
        elif isinstance(item, dict):
            dicts.append(dict(item))
        else:
            raise ArgumentTypeError(f"prompts must be strings or vLLM prompt dicts (TextPrompt, TokensPrompt), got "
                                    f"{type(item).__name__}")
    return dicts


def generate(llm: Any, prompts: Any, sampling_params: Any = None, *,
             steering: Steering | Sequence[Steering] | None = None, steering_rows: RowSpecs | None = None,
             use_tqdm: bool = False, **kwargs: Any) -> list[Any]:
    """``llm.generate(prompts, sampling_params, ...)`` with ``steering`` (specs for every prompt) and
    ``steering_rows`` (one spec, list of specs or None per prompt), in one call; returns vLLM's ``RequestOutput``
    list.

    Each prompt's specs travel with its request (``SamplingParams.extra_args``), so different prompts are steered
    differently in the same batch, and each steered prompt gets its own prefix-cache salt: no request reuses a
    prompt computed with other steering, and relative strengths are measured on each prompt's own prefill (once,
    kept for its generated tokens; ``n > 1`` samples of a prompt share it). Extra keyword arguments go to
    ``llm.generate``.
    """
    vllm = import_vllm()
    rows = _prompt_dicts(prompts)
    shared = steering_list(steering)
    if steering_rows is not None:
        check_rows(steering_rows)
        if len(steering_rows) != len(rows):
            raise ConfigError(f"{len(steering_rows)} per-row steering specs for {len(rows)} prompts")
    row_specs = [steering_list(specs) for specs in steering_rows] if steering_rows is not None else [[]] * len(rows)
    if sampling_params is None:
        sampling_params = llm.get_default_sampling_params()
    params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(rows)
    if len(params) != len(rows) or not all(isinstance(p, vllm.SamplingParams) for p in params):
        raise ConfigError(f"sampling_params must be one vllm.SamplingParams or one per prompt ({len(rows)})")
    call = uuid.uuid4().hex
    by_key: dict[str, list[Steering]] = {}
    sets: dict[tuple[int, ...], int] = {}
    for index, (prompt, own) in enumerate(zip(rows, row_specs, strict=True)):
        specs = shared + own
        if not specs:
            continue
        key = f"{call}:{index}"
        by_key[key] = own
        private = any(spec.relative or spec.positions != "all" for spec in specs)
        group = f"row{index}" if private else f"set{sets.setdefault(tuple(map(id, own)), len(sets))}"
        salt = f"qscope:{call}:{group}"
        prompt["cache_salt"] = f"{prompt['cache_salt']}|{salt}" if prompt.get("cache_salt") else salt
        params[index] = params[index].clone()
        params[index].extra_args = {**(params[index].extra_args or {}), EXTRA_ARGS_KEY: key}
    if not by_key:
        return llm.generate(rows, params, use_tqdm=use_tqdm, **kwargs)
    with EngineSteering(llm, shared, {key: specs for key, specs in by_key.items() if specs},
                        private_cache=True) as session:
        outputs = llm.generate(rows, params, use_tqdm=use_tqdm, **kwargs)
    session.check_ran(generated=any(sample.token_ids for output in outputs for sample in output.outputs))
    return outputs
