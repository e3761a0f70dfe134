"""Where an SAE source lives: a local path, a Qwen-Scope release on the hub, or a hub repo in the qscope layout.

:func:`resolve` turns a source into a local file or directory, downloading only what one layer needs through
``huggingface_hub`` (and its cache); :mod:`qscope_hf.formats` then reads it. Offline, a missing file is an
``OSError`` naming the repo and the file and saying how to load a local copy.

Repo layout (Qwen-Scope releases, and qscope's own): ``layer{n}.sae.pt`` or ``layer{n}.safetensors``, with an
optional ``layer{n}.json`` sidecar.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

from .errors import CheckpointError, ConfigError, MissingFileError
from .releases import Release, get_release, is_release_name

LAYER_FILE = re.compile(r"^layer(\d+)\.(sae\.pt|safetensors)$")


def sidecar_name(layer: int) -> str:
    """The name of the JSON sidecar of ``layer`` (``layer{n}.json``)."""
    return f"layer{layer}.json"


def weights_name(layer: int, fmt: str) -> str:
    """The weights file of ``layer`` in format ``fmt`` (``layer{n}.sae.pt`` or ``layer{n}.safetensors``)."""
    return f"layer{layer}.sae.pt" if fmt == "qwen-scope" else f"layer{layer}.safetensors"


def download(repo_id: str, filename: str, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """One file of a hub repo through ``huggingface_hub`` (cache first); errors name the repo and the file."""
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        raise MissingFileError(
            f"cannot fetch {filename!r} from {repo_id!r}: the hub is unreachable (offline, or HF_HUB_OFFLINE=1) and "
            f"the file is not in the local cache. Download it where the hub is reachable "
            f"(hf download {repo_id} {filename} --local-dir DIR) and load the local copy instead: "
            f"SparseAutoencoder.from_pretrained('DIR', layer=...)"
        ) from None
    except EntryNotFoundError:
        raise MissingFileError(f"hub repo {repo_id!r} has no file {filename!r}") from None
    except RepositoryNotFoundError:
        raise MissingFileError(f"hub repo {repo_id!r} does not exist (or is private)") from None


def resolve(source: str | Path, layer: int | None, *, revision: str | None = None,
            cache_dir: str | Path | None = None) -> tuple[Path, Release | None]:
    """``(local path, release)`` for ``source``: an existing path as it is; for a Qwen-Scope release id, its
    ``layer{n}.sae.pt`` (downloaded) and the release; for another ``owner/name`` hub repo in the qscope layout, the
    weights file its ``layer{n}.json`` sidecar names (both downloaded)."""
    path = Path(source).expanduser()
    if path.exists():
        return path, None
    name = str(source)
    if is_release_name(name):
        release = get_release(name)
        if layer is None:
            raise ConfigError(f"{name} has one SAE per layer (0..{release.num_layers - 1}): pass layer=...")
        return download(name, release.layer_file(layer), revision=revision, cache_dir=cache_dir), release
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        if layer is None:
            raise ConfigError(f"pass layer=... to load an SAE from hub repo {name!r}")
        sidecar = download(name, sidecar_name(layer), revision=revision, cache_dir=cache_dir)
        try:
            weights = json.loads(sidecar.read_text()).get("weights", weights_name(layer, "qscope"))
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"{sidecar} is not a JSON object") from None
        file = download(name, weights, revision=revision, cache_dir=cache_dir)
        if file.parent != sidecar.parent:
            raise CheckpointError(f"hub repo {name!r}: {weights} and {sidecar.name} resolved to different snapshots")
        return file, None
    raise MissingFileError(f"SAE source {name!r} is neither an existing path nor a hub repo id")
