"""The one exception type for mistakes a user can make, and how any message is made safe to print.

Every line pike-prep prints goes through :func:`safe_line`: one line (control characters and
undecodable file-name bytes escaped) with credentials removed (:func:`redact`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# scheme://userinfo@ at the start of a URL's authority (up to the last '@' before the path).
URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s\"'<>]*@")
# Environment variables whose values are credentials (AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, HF_TOKEN, ...).
SECRET_ENV_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|ACCOUNT_KEY|API_KEY|PRIVATE_KEY", re.IGNORECASE
)
MIN_SECRET_CHARS = 8  # shorter values are not redacted where they appear outside a URL's userinfo
REDACTED = "***"


class PrepError(Exception):
    """A user error. ``str(err)`` is a one-line message naming the domain and file involved.

    The message reads ``domain 'NAME': FILE: what is wrong``, leaving out the parts that do
    not apply, and is passed through :func:`safe_line`. It is built once, in the constructor,
    so the error pickles across processes.
    """

    def __init__(self, message: str, *, domain: str | None = None, file: str | None = None):
        parts = []
        if domain is not None:
            parts.append(f"domain {domain!r}")
        if file is not None:
            parts.append(str(file))
        parts.append(message)
        super().__init__(safe_line(": ".join(parts)))

    def in_domain(self, domain: str) -> PrepError:
        """The same error with the domain name in front."""
        return PrepError(str(self), domain=domain)


def describe(err: BaseException) -> str:
    """An exception's message on one line (or its type name when it has none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(err).__name__


def safe_line(text: str) -> str:
    """text without credentials, on one line: non-printable characters are escaped as in repr()."""
    text = redact(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def redact(text: str) -> str:
    """text with the userinfo of every URL and the value of every credential in the environment
    replaced by ``***``."""
    text = URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)
    for secret in secret_values():
        text = text.replace(secret, REDACTED)
    return text


def secret_values(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Credentials found in the environment, longest first: the values of variables named like
    credentials, and the userinfo (and its user and password parts) of URLs in any variable,
    such as ``S3_ENDPOINT_URL=http://user:pass@host``."""
    found = set()
    for name, value in environ.items():
        if SECRET_ENV_NAME.search(name):
            found.add(value)
        for match in URL_USERINFO.finditer(value):
            userinfo = match.group(0)[len(match.group("scheme")) : -1]
            found.update((userinfo, *userinfo.split(":", 1)))
    return sorted((value for value in found if len(value) >= MIN_SECRET_CHARS), key=len, reverse=True)


def has_userinfo(url: str) -> bool:
    """Whether a URL carries userinfo (user:password@) in its authority."""
    return URL_USERINFO.match(url) is not None
