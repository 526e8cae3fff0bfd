"""Where and as whom to connect: a database URL's parts, without SQLAlchemy.

The read-only preflight connects with these alone, and shows the URL as SQLAlchemy would; the
SQLAlchemy URL (whose import is some 0.1 s of every start) is built only when a run needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

DRIVER = "postgresql+asyncpg"


@dataclass(frozen=True)
class Address:
    """Where and as whom to connect: the parts of the target's URL, for a plain asyncpg connection.

    The read-only preflight connects with these alone; SQLAlchemy (whose import is some 0.1 s of
    every start) is loaded only when a URL is needed (display, env.py, applying).
    """

    username: str | None
    password: str | None
    database: str | None
    host: str | None = None
    port: int | None = None
    query: tuple[tuple[str, str], ...] = ()

    def get(self, key: str) -> str | None:
        """Return a query parameter of the URL (host: the socket directory; ssl: the TLS mode)."""
        return dict(self.query).get(key)

    def display(self) -> str:
        """Return the URL as SQLAlchemy renders it with the password hidden (render_as_string)."""
        from urllib.parse import quote, quote_plus

        shown = DRIVER + "://"
        if self.username is not None:
            shown += quote(self.username, safe=" +") + (":***" if self.password is not None else "") + "@"
        if self.host is not None:
            shown += f"[{self.host}]" if ":" in self.host else self.host
        if self.port is not None:
            shown += f":{self.port}"
        if self.database is not None:
            shown += "/" + quote(self.database, safe=" +/")
        if self.query:
            shown += "?" + "&".join(f"{quote_plus(k)}={quote_plus(v)}" for k, v in sorted(self.query))
        return shown

    def to_url(self) -> URL:
        """Return the SQLAlchemy URL (asyncpg driver) of these parts."""
        from sqlalchemy.engine import URL

        return URL.create(
            DRIVER,
            username=self.username,
            password=self.password,
            host=self.host,
            port=self.port,
            database=self.database,
            query=dict(self.query),
        )

    @classmethod
    def of(cls, url: URL) -> Address:
        """Return the parts of a SQLAlchemy URL."""
        query = tuple((k, v if isinstance(v, str) else v[-1]) for k, v in url.query.items())
        return cls(url.username, url.password, url.database, url.host, url.port, query)
