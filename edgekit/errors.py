"""User-facing errors: each names the problem and what to do about it; the CLI prints them without a traceback."""


class EdgekitError(Exception):
    """Base of every error edgekit raises on purpose; `hint` says what to do next."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class CheckpointError(EdgekitError):
    """A checkpoint that does not fit the model family it was given for."""


class UnknownNameError(EdgekitError):
    """An unknown model family, configuration or target."""


class BundleError(EdgekitError):
    """A bundle that is missing, modified, incomplete or built for another target."""


class CompileError(EdgekitError):
    """ONNX export or TVM compilation failed for a reason the user can act on."""


class InputShapeError(EdgekitError):
    """Input of the wrong shape or dtype for a compiled artifact."""
