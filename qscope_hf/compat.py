"""The releases of transformers and TRL whose private internals qscope relies on, checked in one place.

qscope wraps transformers' decoding loops (``GenerationMixin._sample`` / ``_beam_search``, which contain the prefill:
transformers offers no public hook that runs before it) and overrides or reads a few TRL / Trainer internals
(:mod:`qscope_trl.trl_internals` lists them with the reason for each). Those can change in any major release, so
``pyproject.toml`` bounds both and these checks fail clearly, naming the installed release, outside the bounds.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version

from packaging.version import Version

from .errors import UnsupportedError

#: ``(lowest supported, first unsupported)`` release per package; tested with transformers 5.24–5.25 and TRL 1.16.
SUPPORTED = {"transformers": ("5.0", "6.0"), "trl": ("1.16", "2.0")}
TESTED = {"transformers": "5.24", "trl": "1.16"}


def check_release(package: str, found: str | None = None, *, why: str) -> None:
    """An :class:`UnsupportedError` when ``package`` (its installed release, or ``found``) is outside
    :data:`SUPPORTED`; ``why`` says what qscope relies on."""
    if found is None:
        try:
            found = installed_version(package)
        except PackageNotFoundError:
            raise UnsupportedError(f"{why} needs {package}, which is not installed") from None
    low, high = SUPPORTED[package]
    if not Version(low) <= Version(Version(found).base_version) < Version(high):  # a dev / rc release counts as its own
        raise UnsupportedError(f"{why} and supports {package}>={low},<{high} (tested with {TESTED[package]}); found "
                               f"{package} {found}. Install {package}>={low},<{high}")


def check_transformers(version: str | None = None) -> None:
    """Fail clearly outside the transformers releases whose decoding loops steering wraps."""
    from transformers import GenerationMixin

    why = ("qscope steering wraps transformers' decoding loops (GenerationMixin._sample and _beam_search; without "
           "them, steer plain forwards with qscope_hf.steered)")
    check_release("transformers", version, why=why)
    missing = [name for name in ("_sample", "_beam_search") if not hasattr(GenerationMixin, name)]
    if missing:
        raise UnsupportedError(f"{why}, but this transformers has no {missing}")


def check_trl(version: str | None = None) -> None:
    """Fail clearly outside the TRL releases whose internals :mod:`qscope_trl` reads."""
    check_release("trl", version, why="qscope_trl overrides and reads TRL trainer internals (qscope_trl.trl_internals)")
