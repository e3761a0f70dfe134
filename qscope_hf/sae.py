"""``SparseAutoencoder``: a Qwen-Scope TopK SAE as an ``nn.Module``; all of its math runs in :mod:`qscope_hf.ops`.

Parameters use the Qwen-Scope orientation: ``W_enc [d_sae, d_model]`` (row i = latent i), ``W_dec [d_model, d_sae]``
(column i = direction of feature i), ``b_enc [d_sae]``, ``b_dec [d_model]``. ``W_dec`` is *stored* feature-major
(``W_dec.T`` is contiguous) so that decoding and steering read each feature's direction from contiguous memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import formats, ops
from .config import SAEConfig
from .errors import ArgumentTypeError, ConfigError
from .formats import Format
from .ops import Activation
from .ops.dispatch import Backend
from .validation import integer_ids

Features = int | Sequence[int] | Tensor


class SparseAutoencoder(nn.Module):
    """A TopK sparse autoencoder reading the residual stream after decoder layer ``layer``.

    ``activation="relu_topk"`` (default, the official demo's) keeps the k largest pre-activations and clamps them
    at 0; ``"topk"`` (the model card's snippet) keeps them as they are. ``backend`` picks the op backend
    (``None``: automatic, see :mod:`qscope_hf.ops.dispatch`).
    """

    def __init__(self, d_model: int, d_sae: int, k: int, activation: Activation = "relu_topk", *,
                 layer: int | None = None, release: str | None = None, model_id: str | None = None,
                 dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, backend: Backend | None = None) -> None:
        super().__init__()
        self.cfg = SAEConfig(d_model, d_sae, k, activation, layer, release, model_id)
        self.backend = backend
        factory: dict[str, Any] = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(d_sae, d_model, **factory))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_model, **factory).T)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **factory))
        if self.W_enc.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder directions, encoder initialised as the decoder's transpose, zero biases."""
        directions = torch.randn(self.d_sae, self.d_model, generator=generator, device="cpu", dtype=torch.float32)
        directions /= directions.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(directions.T)
        self.W_enc.copy_(directions)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- metadata ---------------------------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        """Width of the residual stream the SAE reads."""
        return self.cfg.d_model

    @property
    def d_sae(self) -> int:
        """Number of latents (features)."""
        return self.cfg.d_sae

    @property
    def k(self) -> int:
        """Latents kept per token by TopK."""
        return self.cfg.k

    @property
    def activation(self) -> str:
        """``"relu_topk"`` (TopK of ReLU) or ``"topk"`` (the model card's variant)."""
        return self.cfg.activation

    @property
    def layer(self) -> int | None:
        """The decoder layer whose output the SAE reads (None when unknown)."""
        return self.cfg.layer

    @property
    def release(self) -> str | None:
        """The Qwen-Scope release repo the SAE came from, if any."""
        return self.cfg.release

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the SAE's weights."""
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        """The device of the SAE's weights."""
        return self.W_enc.device

    def extra_repr(self) -> str:
        where = f", layer={self.layer}" if self.layer is not None else ""
        source = f", release={self.release!r}" if self.release else ""
        return f"d_model={self.d_model}, d_sae={self.d_sae}, k={self.k}, activation={self.activation!r}{where}{source}"

    # -- checks -----------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor, what: str = "activations") -> None:
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise ConfigError(f"{what} must be a tensor [..., d_model={self.d_model}], got "
                              f"{'a 0-d tensor' if isinstance(x, Tensor) else type(x).__name__}")
        if x.shape[-1] != self.d_model:
            raise ConfigError(f"{what} have d_model={x.shape[-1]}, but this SAE reads d_model={self.d_model}")
        if x.device != self.device:
            raise ConfigError(f"{what} are on {x.device} but the SAE is on {self.device}; move one of them")
        if x.dtype != self.dtype:
            raise ArgumentTypeError(f"{what} are {x.dtype} but the SAE is {self.dtype}; cast one of them "
                                    f"(e.g. sae.to({x.dtype}) or from_pretrained(..., dtype={x.dtype}))")

    def feature_index(self, features: Features) -> Tensor:
        """Validate feature ids and return them as a 1-D int64 tensor on the SAE's device."""
        return integer_ids("feature", features, self.d_sae, of=f" for an SAE with d_sae={self.d_sae}").to(self.device)

    # -- math (all through qscope_hf.ops) -----------------------------------------------------------------------
    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k codes of ``x [..., d_model]``: ``(values [..., k], indices [..., k])``."""
        self._check_input(x)
        return ops.topk_encode(x, self.W_enc, self.b_enc, self.k, self.activation, backend=self.backend)

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes ``[..., d_sae]`` (zeros outside the top k)."""
        values, indices = self.encode_topk(x)
        return ops.dense_codes(values, indices, self.d_sae)

    def pre_acts(self, x: Tensor, features: Features | None = None) -> Tensor:
        """Pre-activations ``x · W_enc[f] + b_enc[f]``: ``[..., d_sae]``, or ``[..., S]`` for selected features.

        With ``features`` only those encoder rows are read. Differentiable with respect to ``x``.
        """
        self._check_input(x)
        if features is None:
            return ops.feature_pre_acts(x, self.W_enc, self.b_enc)
        index = self.feature_index(features)
        return ops.feature_pre_acts(x, self.W_enc[index], self.b_enc[index])

    def feature_reader(self, features: Features) -> FeatureReader:
        """A reader of ``features``' (pre-)activations from their encoder rows only, for hidden states of any dtype
        and device (see :class:`FeatureReader`)."""
        return FeatureReader(self, features)

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction from dense codes: ``[..., d_sae] -> [..., d_model]``."""
        if z.shape[-1] != self.d_sae:
            raise ConfigError(f"codes have d_sae={z.shape[-1]}, but this SAE has d_sae={self.d_sae}")
        return ops.dense_decode(z, self.W_dec, self.b_dec)

    def decode_topk(self, values: Tensor, indices: Tensor, *, check_indices: bool = True) -> Tensor:
        """Reconstruction from top-k codes without dense codes: ``[..., k] -> [..., d_model]``.

        ``check_indices=False`` skips the range check (a host sync on GPU) for codes from :meth:`encode_topk`.
        """
        return ops.sparse_decode(values, indices, self.W_dec, self.b_dec, backend=self.backend,
                                 check_indices=check_indices)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x [..., d_model]`` through the top-k codes."""
        return self.decode_topk(*self.encode_topk(x), check_indices=False)

    # -- training geometry (the recipe of Gao et al. 2024, as in sparsify) ------------------------------------------
    def training_loss(self, x: Tensor, *, dead: Tensor | None = None, aux_k: int | None = None,
                      variance: Tensor | None = None) -> TrainingLoss:
        """FVU of reconstructing ``x [N, d_model]`` and, when ``dead [d_sae]`` (bool) marks dead latents, the AuxK
        loss: the dead latents' top ``aux_k`` codes reconstructing the main error, over the same variance.

        ``variance`` (a scalar) replaces ``Σ‖x − mean(x)‖²`` as the denominator: data-parallel training passes the
        whole batch's, so that each process's loss is its share of the batch's FVU."""
        values, indices = self.encode_topk(x)
        error = self.decode_topk(values, indices, check_indices=False) - x
        if variance is None:
            variance = (x - x.mean(0)).pow(2).sum()
        fvu = error.pow(2).sum() / variance
        aux = fvu.new_zeros(())
        if dead is not None and bool(dead.any()):
            rows = dead.nonzero().squeeze(1).to(x.device)
            k_aux = min(aux_k or self.d_model // 2, len(rows))
            dead_values, dead_indices = ops.topk_encode(x, self.W_enc[rows], self.b_enc[rows], k_aux, "topk")
            error_hat = ops.sparse_decode(dead_values, dead_indices, self.W_dec[:, rows], torch.zeros_like(self.b_dec),
                                          check_indices=False)
            aux = (error_hat + error.detach()).pow(2).sum() / variance
        return TrainingLoss(fvu, aux, values, indices)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Scale every decoder column ``W_dec[:, i]`` to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp(min=1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project each decoder column's gradient onto the tangent space of its (unit) direction, so that a step
        changes directions, not norms."""
        if self.W_dec.grad is not None:
            self.W_dec.grad -= (self.W_dec.grad * self.W_dec).sum(0, keepdim=True) * self.W_dec

    def feature_directions(self, features: Features) -> Tensor:
        """Decoder columns ``W_dec[:, f]`` returned as rows: ``[S, d_model]`` (``[d_model]`` for one int)."""
        index = self.feature_index(features)
        directions = self.W_dec.T[index]
        return directions[0] if isinstance(features, int) else directions

    # -- checkpoints ------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, checkpoint: formats.Checkpoint, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> SparseAutoencoder:
        """Build from a :class:`~qscope_hf.formats.Checkpoint`, copying each tensor once into place."""
        cfg, tensors = checkpoint.config, checkpoint.tensors
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ArgumentTypeError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, "
                                    f"...), got {dtype!r}")
        dtype = dtype or tensors["W_enc"].dtype
        device = torch.device(device or "cpu")
        sae = cls(cfg.d_model, cfg.d_sae, cfg.k, cfg.activation, layer=cfg.layer, release=cfg.release,
                  model_id=cfg.model_id, device="meta")
        with torch.no_grad():
            for name in formats.TENSOR_KEYS:
                source = tensors[name]
                target = torch.empty(source.T.shape if name == "W_dec" else source.shape, dtype=dtype, device=device)
                target.copy_(source.T if name == "W_dec" else source)
                setattr(sae, name, nn.Parameter(target.T if name == "W_dec" else target))
        return sae

    @classmethod
    def from_pretrained(cls, source: str | Path, layer: int | None = None, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, k: int | None = None,
                        activation: Activation | None = None, revision: str | None = None,
                        cache_dir: str | Path | None = None) -> SparseAutoencoder:
        """Load one layer's SAE.

        ``source`` is a Qwen-Scope release (``"Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"``: only
        ``layer{n}.sae.pt`` is downloaded), a local directory laid out like a release repo, a single ``.sae.pt``
        or qscope ``.safetensors`` file, a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``), or a
        hub repo saved by :meth:`save_pretrained`. ``k``/``activation`` override what the checkpoint says
        (needed for a bare ``.sae.pt`` outside a release). Weights are cast to ``dtype`` and moved to ``device``.
        """
        checkpoint = formats.read(source, layer, revision=revision, cache_dir=cache_dir, k=k, activation=activation)
        return cls.from_checkpoint(checkpoint, dtype=dtype, device=device)

    def save_pretrained(self, directory: str | Path, format: Format = "qscope") -> Path:
        """Write this SAE to ``directory`` as ``"qscope"`` (safetensors + JSON), ``"qwen-scope"`` (``.sae.pt``)
        or ``"saelens"``; :meth:`from_pretrained` reads any of them back identically. Returns the weights file."""
        tensors = {name: getattr(self, name) for name in formats.TENSOR_KEYS}
        return formats.write(self.cfg, tensors, directory, format)


def saes_by_layer(saes: SparseAutoencoder | Sequence[SparseAutoencoder], *, who: str,
                  hint: str = "") -> dict[int, SparseAutoencoder]:
    """``{layer: sae}`` for one SAE or a sequence of them: the rule of the monitor and the penalty, which read one SAE
    per layer (each SAE with its layer set). ``who`` names the caller in errors, ``hint`` ends the message."""
    saes = [saes] if isinstance(saes, SparseAutoencoder) else list(saes)
    for sae in saes:
        if not isinstance(sae, SparseAutoencoder):
            raise ArgumentTypeError(f"{who} takes SparseAutoencoders, got {type(sae).__name__}")
    layers = [sae.layer for sae in saes]
    if None in layers or len(set(layers)) != len(layers):
        raise ConfigError(f"give one SAE per layer, each with its layer set (got layers {layers}){hint}")
    return {sae.layer: sae for sae in saes}


class TrainingLoss(NamedTuple):
    """What :meth:`SparseAutoencoder.training_loss` returns: ``fvu`` and ``aux`` (0-d, differentiable), and the
    codes ``values`` / ``indices [N, k]``."""

    fvu: Tensor
    aux: Tensor
    values: Tensor
    indices: Tensor


def fraction_of_variance_unexplained(x: Tensor, reconstruction: Tensor) -> Tensor:
    """``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`` over the rows of ``x [N, d]`` (0-d; differentiable)."""
    return (reconstruction - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


class FeatureReader:
    """Pre-activations ``f_s(h) = h · W_enc[s] + b_enc[s]`` and activations ``ReLU(f_s(h))`` of selected features
    ``s``, from their encoder rows only (no full encode; exact for a feature in the top-k, as any firing feature is).

    The rows are copied when the reader is made (a frozen snapshot of the SAE) and cast once per dtype and device of
    the hidden states it reads, so hooks on a bf16 model on GPU read an fp32 SAE on CPU. Differentiable with respect
    to the hidden states (the SASFT penalty's gradient flows through it); never with respect to the SAE.
    """

    def __init__(self, sae: SparseAutoencoder, features: Features) -> None:
        self.features = sae.feature_index(features).cpu()
        with torch.no_grad():
            index = self.features.to(sae.device)
            self._rows = sae.W_enc[index].detach().clone()
            self._bias = sae.b_enc[index].detach().clone()
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.features)

    def _on(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = (self._rows.to(device=device, dtype=dtype), self._bias.to(device=device, dtype=dtype))
        return self._cast[key]

    def pre_acts(self, hidden: Tensor) -> Tensor:
        """``[..., S]`` pre-activations of ``hidden [..., d_model]`` (in the hidden states' dtype)."""
        return ops.feature_pre_acts(hidden, *self._on(hidden.dtype, hidden.device))

    def acts(self, hidden: Tensor) -> Tensor:
        """``[..., S]`` activations ``ReLU(f_s(hidden))``."""
        return self.pre_acts(hidden).relu()

    __call__ = acts
