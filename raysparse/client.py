"""A small Python client for the recommendation API (`raysparse serve`), also behind `raysparse query`.

    from raysparse.client import RecommenderClient

    with RecommenderClient("http://127.0.0.1:8000") as client:
        client.recommend(user_id="u042", k=10).items            # a known user
        client.recommend(history=["i007", "i311"])               # a new user, oldest item first (fold-in)
        client.recommend(text="space opera with robots")         # a user with no history
        client.item("i007"); client.health()

Ray-free: it only speaks HTTP. A 4xx from the server raises `RequestRejected` carrying the server's message,
which says what to send instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import quote

import httpx

from raysparse.errors import UserError

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(UserError):
    """The request did not produce recommendations; the message says why and what to do."""


class RequestRejected(ClientError):
    """The server answered 4xx (bad input) or 5xx; `.status` and `.payload` hold its answer."""

    def __init__(self, status: int, detail: str, payload: dict | None = None):
        super().__init__(f"server answered {status}: {detail}")
        self.status, self.detail, self.payload = status, detail, payload or {}

    @property
    def unknown(self) -> list:
        """Ids the server did not know (unknown user, or unknown items in history / exclude)."""
        return list(self.payload.get("unknown", []))


class ServerUnreachable(ClientError):
    """No server answered at the URL."""


@dataclass(frozen=True)
class RecommendedItem:
    item_id: Any                 # raw id as in the training data (str or int)
    score: float
    title: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class Recommendations:
    path: str                    # "warm" (known user), "fold_in" (from a history) or "text"
    items: list[RecommendedItem]
    model_id: str                # the artifact that answered; changes when the server hot-swaps its model
    notes: list[str] = field(default_factory=list)

    @property
    def item_ids(self) -> list:
        return [item.item_id for item in self.items]


class RecommenderClient:
    """Blocking client over one HTTP connection pool. `url` includes the route prefix, if any."""

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 30.0):
        if not url.startswith(("http://", "https://")):
            raise ClientError(f"url={url!r} must start with http:// or https://, e.g. {DEFAULT_URL}.")
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def recommend(self, user_id: Any = None, history: Sequence | None = None, text: str | None = None,
                  k: int = 10, exclude_seen: bool = True, exclude: Sequence | None = None) -> Recommendations:
        """Send user_id (known user), history (item ids, oldest first), both, or text. See POST /recommend."""
        if isinstance(history, (str, bytes)):
            raise ClientError(f"history={history!r} must be a list of item ids, oldest first, e.g. "
                              f"history=['i007', 'i311'].")
        body: dict[str, Any] = {"k": k, "exclude_seen": exclude_seen}
        if user_id is not None:
            body["user_id"] = user_id
        if history is not None:
            body["history"] = list(history)
        if text is not None:
            body["text"] = text
        if exclude:
            body["exclude"] = list(exclude)
        data = self._request("POST", "/recommend", json=body)
        return Recommendations(path=data["path"], model_id=data["model_id"], notes=list(data.get("notes", [])),
                               items=[RecommendedItem(i["item_id"], float(i["score"]), i.get("title"),
                                                      i.get("text")) for i in data["items"]])

    def item(self, item_id: Any) -> dict:
        """The catalogue row of one item (title, text, ...)."""
        return self._request("GET", f"/items/{quote(str(item_id), safe='')}")

    def health(self) -> dict:
        """{"status": "ok", "model_id", "items", "users", "text_tower", ...}."""
        return self._request("GET", "/healthz")

    def _request(self, method: str, path: str, **kwargs: Any) -> dict:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise ServerUnreachable(f"no answer from {self.url} ({type(err).__name__}: {err}); is the server "
                                    f"running? Start it with `raysparse serve --artifact DIR`, or pass the "
                                    f"right --url.") from err
        try:
            payload = response.json()
        except ValueError:
            payload = {"detail": response.text[:200]}
        if response.status_code >= 400:
            detail = payload.get("detail") if isinstance(payload, dict) else None
            raise RequestRejected(response.status_code, str(detail or payload),
                                  payload if isinstance(payload, dict) else None)
        return payload

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RecommenderClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
