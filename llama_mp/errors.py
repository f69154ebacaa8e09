"""The one exception type users see.

A `LlamaMPError` carries a message written for a person: what is wrong, where, and what to do.
Entry points catch it, print the message once (on the rank that found the problem) and exit non-zero;
anything else that escapes is a bug in llama_mp and keeps its traceback.
"""


class LlamaMPError(Exception):
    """A problem with the user's input or environment, explained in one paragraph."""

    exit_code = 2


class RemoteRankError(LlamaMPError):
    """Another rank failed and has already printed why; this rank only needs to stop."""

    exit_code = 3
