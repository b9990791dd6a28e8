"""Errors that mean "the input was wrong". A leaf module (imports nothing of ours): every user-facing
error derives from ``BridgeError``, and the CLI maps that one class to a single line on stderr and
exit code 2. Anything else escaping a command is a bug (exit 1 with a traceback)."""


class BridgeError(ValueError):
    """Bad input: a message that names the thing that is wrong and how to fix it."""


class UsageError(BridgeError):
    """A command-line argument or combination of arguments is wrong."""


class CheckpointError(BridgeError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


class DeviceError(BridgeError):
    """The requested devices do not exist."""


class GenerationError(BridgeError):
    """A generation request cannot be served (prompt too long, bad sampling settings, no tokenizer)."""


class ShardingError(BridgeError):
    """A scheme, mesh or rule does not fit the parameters it is applied to."""


class LaunchError(BridgeError):
    """A multi-process launch cannot start."""


class DoesNotFit(BridgeError):
    """What was asked for needs more memory than the devices that would hold it have."""


class RequestError(BridgeError):
    """An HTTP request to ``serve`` is wrong (or cannot be served now): its status code and the
    OpenAI error type go back to the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
