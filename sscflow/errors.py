"""Every error sscflow raises on purpose.

Each class also derives from the built-in kind a caller would expect (``ValueError`` for bad
input, ``FileNotFoundError`` for a missing file), so ``except ValueError`` keeps working.
The CLI prints these as one line, without a traceback.
"""


class SscflowError(Exception):
    """Base class: an expected failure with a message that names the thing and the fix."""


class ConfigError(SscflowError, ValueError):
    """A configuration file has an unknown key, a wrong type or an impossible value."""


class ManifestError(SscflowError, ValueError):
    """A manifest CSV is malformed; the message lists every problem by line and column."""

    def __init__(self, path, problems):
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"manifest {self.path} has {n} problem{'s' if n != 1 else ''}:\n{lines}")


class InputImageError(SscflowError, ValueError):
    """An input image is unreadable, truncated, not 3-D or not a CT in Hounsfield units."""


class MissingInputError(SscflowError, FileNotFoundError):
    """An input file or folder named by a manifest or a command does not exist."""


class IngestError(SscflowError):
    """One or more patients failed to ingest; the message summarises them."""


class IncompleteOutputError(SscflowError, FileNotFoundError):
    """A store output is absent or was never marked complete (an interrupted write)."""


class SegmentationError(SscflowError, ValueError):
    """The lung mask could not be made (no air inside the body, or an empty mask)."""


class MissingDependencyError(SscflowError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class RegistrationInputError(SscflowError, ValueError):
    """Registration inputs disagree (shapes, spacing) or hold NaN / inf, or the mask is empty."""


class UnknownBackendError(SscflowError, ValueError):
    """A registration backend name is not in the registry; the message lists the choices."""


class LeaseHeldError(SscflowError):
    """Another run holds the store's lease (see ``sscflow.flow.lease``); the message names it."""


class LeaseLostError(SscflowError):
    """This run's lease was taken over by another run; the run stopped, the message names the
    new holder."""


class RegistrationFailedError(SscflowError, ValueError):
    """A pair that cannot be registered: lungs that do not align, a follow-up that covers too
    little of the baseline lung."""
