"""qscope's exceptions: one class per kind of mistake, the same everywhere in qscope_hf and qscope_trl.

Each also derives from the built-in exceptions Python code would expect for that mistake (``ValueError``,
``IndexError``, ``KeyError``; a bad layer is both an ``IndexError`` and a ``ValueError``, a missing column both a
``KeyError`` and a ``ValueError``), so existing ``except`` clauses keep working.

- :class:`QscopeError`: the base of all of them;
- :class:`ConfigError`: a bad argument value (a size or count ≤ 0, a non-finite number, an unknown choice);
- :class:`LayerError`: a layer the model does not have;
- :class:`FeatureIndexError`: a feature id outside ``[0, d_sae)``;
- :class:`MissingColumnError`: a dataset without the column an argument names;
- :class:`CheckpointError`: a checkpoint file or directory that cannot be read as an SAE.
"""

from __future__ import annotations


class QscopeError(Exception):
    """Base class of qscope's errors."""


class ConfigError(QscopeError, ValueError):
    """A bad argument or configuration value."""


class LayerError(QscopeError, IndexError, ValueError):
    """A decoder layer out of the model's (or a release's) range."""


class FeatureIndexError(QscopeError, IndexError):
    """A feature index outside ``[0, d_sae)``."""


class MissingColumnError(QscopeError, KeyError, ValueError):
    """A dataset lacks a column that an argument names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(QscopeError, ValueError):
    """A checkpoint that cannot be read as an SAE (names the file and what is wrong)."""
