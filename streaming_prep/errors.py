"""The one exception type for mistakes a user can make (bad input, options or output)."""

from __future__ import annotations


class PrepError(Exception):
    """A user error. ``str(err)`` is a one-line message naming the domain and file involved.

    The message reads ``domain 'NAME': FILE: what is wrong``, leaving out the parts that do
    not apply. It is built once, in the constructor, so the error pickles across processes.
    """

    def __init__(self, message: str, *, domain: str | None = None, file: str | None = None):
        parts = []
        if domain is not None:
            parts.append(f"domain {domain!r}")
        if file is not None:
            parts.append(str(file))
        parts.append(message)
        super().__init__(": ".join(parts))

    def in_domain(self, domain: str) -> PrepError:
        """The same error with the domain name in front."""
        return PrepError(str(self), domain=domain)


def describe(err: BaseException) -> str:
    """The first line of an exception's message (or its type name when it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
