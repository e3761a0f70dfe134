"""Registry of the 14 published Qwen-Scope SAE releases (docs/releases.md).

Each release is one hub repo ``Qwen/SAE-Res-{backbone}-W{width/1024}K-L0_{k}`` holding ``layer{n}.sae.pt`` for
every decoder layer of its backbone. Look releases up by repo id (:func:`get_release`) or by backbone, k and
width (:func:`find_release`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import LayerError, UnknownReleaseError

REPO_PREFIX = "Qwen/SAE-Res-"


@dataclass(frozen=True)
class Release:
    """One Qwen-Scope SAE release: which model it reads and the shape of its per-layer SAEs."""

    backbone: str
    num_layers: int
    d_model: int
    d_sae: int
    k: int
    family: str

    @property
    def repo_id(self) -> str:
        """The hub repo of the release, ``Qwen/SAE-Res-{backbone}-W{width/1024}K-L0_{k}``."""
        return f"{REPO_PREFIX}{self.backbone}-W{self.d_sae // 1024}K-L0_{self.k}"

    @property
    def model_id(self) -> str:
        """The hub id of the backbone model the SAEs were trained on."""
        return f"Qwen/{self.backbone}"

    @property
    def layers(self) -> range:
        """The layers the release has an SAE for (every decoder layer of its backbone)."""
        return range(self.num_layers)

    def layer_file(self, layer: int) -> str:
        """The file of ``layer`` inside the release repo (raises on a layer the backbone does not have)."""
        if layer not in self.layers:
            raise LayerError(f"layer {layer} is out of range for {self.repo_id}: {self.backbone} has layers "
                             f"0..{self.num_layers - 1}")
        return f"layer{layer}.sae.pt"


def _pair(backbone: str, layers: int, d_model: int, family: str, widths: tuple[int, int]) -> list[Release]:
    return [Release(backbone, layers, d_model, width, k, family) for width, k in zip(widths, (50, 100))]


RELEASES: tuple[Release, ...] = tuple(
    _pair("Qwen3-1.7B-Base", 28, 2048, "qwen3", (32768, 32768))
    + _pair("Qwen3-8B-Base", 36, 4096, "qwen3", (65536, 65536))
    + _pair("Qwen3.5-2B-Base", 24, 2048, "qwen3_5", (32768, 32768))
    + _pair("Qwen3.5-9B-Base", 32, 4096, "qwen3_5", (65536, 65536))
    + _pair("Qwen3.5-27B", 64, 5120, "qwen3_5", (81920, 81920))
    + _pair("Qwen3-30B-A3B-Base", 48, 2048, "qwen3_moe", (32768, 131072))
    + _pair("Qwen3.5-35B-A3B-Base", 40, 2048, "qwen3_5_moe", (32768, 131072))
)

_BY_REPO = {release.repo_id: release for release in RELEASES}


def register_release(release: Release) -> Release:
    """Add a release to the registry (e.g. one published after this qscope version); returns it."""
    _BY_REPO[release.repo_id] = release
    return release


def list_releases() -> list[Release]:
    """All known releases: the published ones in the paper's order (by backbone, then k), then registered ones."""
    return list(_BY_REPO.values())


def is_release_name(name: str) -> bool:
    """Whether ``name`` looks like a Qwen-Scope repo id (known or not)."""
    return name.startswith(REPO_PREFIX)


def get_release(repo_id: str) -> Release:
    """The release published as ``repo_id``; :class:`UnknownReleaseError` names the closest ones otherwise."""
    try:
        return _BY_REPO[repo_id]
    except KeyError:
        close = difflib.get_close_matches(repo_id, list(_BY_REPO), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see qscope_hf.list_releases()"
        raise UnknownReleaseError(f"unknown Qwen-Scope release {repo_id!r}{hint}") from None


def find_release(backbone: str, *, k: int = 50, width: int | None = None) -> Release:
    """The release for ``backbone`` (e.g. ``"Qwen3-8B-Base"`` or ``"Qwen/Qwen3-8B-Base"``) with this ``k``.

    ``width`` (d_sae) is needed only to tell apart releases of one backbone with the same k (none today).
    """
    name = backbone.removeprefix("Qwen/")
    matches = [r for r in _BY_REPO.values() if r.backbone == name and r.k == k and width in (None, r.d_sae)]
    if not matches:
        raise UnknownReleaseError(f"no Qwen-Scope release for backbone {backbone!r} with k={k}"
                                  + (f" and width={width}" if width else "")
                                  + f"; backbones: {sorted({r.backbone for r in _BY_REPO.values()})}")
    return matches[0]
