"""qscope's exceptions: one class per kind of mistake, the same everywhere in qscope_hf and qscope_trl.

Every refusal of qscope raises a :class:`QscopeError`. Each class also derives from the built-in exception Python
code would expect for that mistake (``ValueError``, ``TypeError``, ``IndexError``, ``KeyError``,
``FileNotFoundError``, ``RuntimeError``), so existing ``except`` clauses keep working.

- :class:`QscopeError`: the base of all of them;
- :class:`ConfigError`: a bad argument value (a size or count ≤ 0, a non-finite number, an unknown choice, two
  arguments that do not fit together);
- :class:`ArgumentTypeError`: an argument of the wrong type (a float where a feature id or token id goes, a
  string where a list goes), or tensors of mismatched dtypes;
- :class:`LayerError`: a layer the model does not have;
- :class:`FeatureIndexError`: a feature id outside ``[0, d_sae)``;
- :class:`PositionError`: a steering position outside a prompt's sequence;
- :class:`MissingColumnError`: a dataset without the column an argument names;
- :class:`CheckpointError`: a checkpoint file or directory that cannot be read as an SAE (names the file);
- :class:`MissingFileError`: a file or hub file that is not there (also a hub file that cannot be fetched
  offline and is not cached); :class:`OutputExistsError`: an output path
  that exists (pass ``overwrite=True``);
- :class:`MissingDependencyError`: an optional package a feature needs is not installed (names the install);
- :class:`UnknownReleaseError`: a release name that is not a published Qwen-Scope release;
- :class:`UnsupportedError`: something qscope cannot do in this setting, with the reason (a generation strategy,
  a transformers release, an ops backend on this machine: :class:`BackendUnavailableError`);
- :class:`SteeringNotActiveError`: steering was asked for where its hooks cannot act, so it would be silently off.
"""

from __future__ import annotations


class QscopeError(Exception):
    """Base class of qscope's errors."""


class ConfigError(QscopeError, ValueError):
    """A bad argument or configuration value."""


class ArgumentTypeError(QscopeError, TypeError):
    """An argument of the wrong type."""


class LayerError(QscopeError, IndexError, ValueError):
    """A decoder layer out of the model's (or a release's) range."""


class FeatureIndexError(QscopeError, IndexError, ValueError):
    """A feature index outside ``[0, d_sae)``."""


class PositionError(QscopeError, IndexError, ValueError):
    """A steering position outside a prompt row's sequence."""


class MissingColumnError(QscopeError, KeyError, ValueError):
    """A dataset lacks a column that an argument names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(QscopeError, ValueError):
    """A checkpoint that cannot be read as an SAE (names the file and what is wrong)."""


class MissingFileError(QscopeError, FileNotFoundError):
    """A file, directory or hub file that does not exist."""


class OutputExistsError(QscopeError, FileExistsError):
    """An output path that already exists (pass ``overwrite=True``, ``--overwrite`` on the command line)."""


class MissingDependencyError(QscopeError, ModuleNotFoundError):
    """An optional package that a feature needs is not installed (the message says how to install it)."""


class UnknownReleaseError(QscopeError, KeyError):
    """A release name that is not one of the published Qwen-Scope releases."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedError(QscopeError, NotImplementedError):
    """Something qscope cannot do in this setting (also a ``RuntimeError``); the message says why."""


class BackendUnavailableError(UnsupportedError):
    """An ops backend was asked for (per call or by ``QSCOPE_OPS_BACKEND``) that cannot run here."""


class SteeringNotActiveError(QscopeError, RuntimeError):
    """Steering was asked for where its hooks cannot act (it would be silently off)."""
