"""fxrf: a torch.fx compiler for CNNs driven by the 3D receptive field (3DRF).

    >>> import torch.nn as nn, fxrf
    >>> a = fxrf.analyze(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()), (1, 3, 32, 32))
    >>> a.record("_0").rf.volume        # 3x3 pixels x 3 channels
    27
"""
from .analysis import META_KEY, RF, Analysis, NodeRecord, Stage, analyze
from .errors import AnalysisError, DuplicateRuleError, FxrfError, InputError, TraceError, UnsupportedOpError
from .ops import Decline, Op, OpTable, op, rf_rule
from .ops import DEFAULT as DEFAULT_OPS
from . import rules as _rules  # noqa: F401  (registers the built-in ops in DEFAULT_OPS)
from .trace import trace
# The passes import core modules, never the package root: importing them here gives the real signatures.
from .passes.organizer import organize_stages  # noqa: E402
from .passes.decomposer import decompose  # noqa: E402
from .passes.pipeline import OptimizeResult, optimize  # noqa: E402
from .passes.user_model import apply  # noqa: E402
from .passes.prune import PruneResult, prune  # noqa: E402
from .training.distill import distill  # noqa: E402


def __getattr__(name):  # fxrf.compile loads torch._dynamo (seconds): only when asked for
    if name == "compile":
        from .compiler import compile_model
        return compile_model
    raise AttributeError(f"module 'fxrf' has no attribute {name!r}")


__all__ = ["compile", "optimize", "OptimizeResult", "apply", "prune", "PruneResult", "organize_stages", "decompose", "distill", "analyze", "trace", "rf_rule", "op", "Op", "OpTable",
           "DEFAULT_OPS", "Decline", "DuplicateRuleError", "Analysis", "NodeRecord", "RF", "Stage", "META_KEY",
           "FxrfError", "TraceError", "InputError", "UnsupportedOpError", "AnalysisError"]
__version__ = "0.1.0"
