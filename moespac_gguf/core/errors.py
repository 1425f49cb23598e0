"""The one exception type users see.

Every bad input (missing file, not a GGUF, not an MoE, budget too small, draft
with another vocabulary, ...) raises MoespacError with a one-line message; the
CLI prints it as `moespac: error: <message>` and exits 2, never a traceback.
"""


class MoespacError(Exception):
    """A user-facing error whose str() is a complete one-line explanation."""


class RemoteDeviceLost(MoespacError):
    """An RPC server (llama.rpc) stopped answering in the middle of a call: what that call
    computed is discarded. `endpoint` is the server's HOST:PORT."""

    def __init__(self, endpoint: str, message: str):
        super().__init__(message)
        self.endpoint = endpoint
