"""fxrf's exceptions. Each message names the node, the op and what to do about it."""


class FxrfError(Exception):
    """Base class of every error fxrf raises on purpose."""


class TraceError(FxrfError):
    """The model could not be turned into a GraphModule with shapes."""


class InputError(FxrfError, ValueError):
    """The model or the example input is not what fxrf can work with (wrong type, rank, channels)."""


class UnsupportedOpError(FxrfError):
    """strict=True and a node has no receptive-field rule."""


class AnalysisError(FxrfError):
    """A rule failed on a node; the message names the node and the op."""


class DuplicateRuleError(FxrfError, ValueError):
    """A second op was registered for a target that already has one in the same op table."""


class SaveError(FxrfError, ValueError):
    """A result cannot be written, would replace a file fxrf did not write, or does not reload to the same outputs."""


class UsageError(Exception):
    """Bad command-line usage, or a MODEL / --weights / --calibrate that cannot be loaded: the CLI exits 2 with this
    one line. Not an FxrfError: the library's API never raises it (fxrf.cli and fxrf.sources do)."""
