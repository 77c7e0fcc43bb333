"""What a Ray cluster's address looks like (the CLI reads `--ray ADDRESS` with it, before anything heavy loads)."""

from __future__ import annotations

import re

LOCAL = "local"  # start a Ray instance on this machine
# HOST:PORT (an IPv6 host in brackets), or Ray Client's ray://HOST:PORT
ADDRESS = re.compile(r"^(?:ray://)?(?P<host>\[[0-9a-fA-F:]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})$")


def looks_like_address(text: str) -> bool:
    """Whether `text` is a Ray address composer takes: HOST:PORT, ray://HOST:PORT, auto or local."""
    return text in ("auto", LOCAL) or ADDRESS.match(text) is not None
