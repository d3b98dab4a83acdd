"""The HTTP API of a served artifact, without Ray: what a request may say and how it is answered.

    POST /recommend   top-k for a known user, a history (fold-in) or a text     GET /items/{item_id}   GET /healthz

Top to bottom:
  ServedModel          a loaded `Recommender` plus the catalogue columns a response shows (title, text).
  request/response     pydantic models (also the OpenAPI page at /docs); every bad input -> 4xx with a fix.
  plan_query           checks a request against the model -> a `Query` in index space: raw ids become
                       indices here, once, and the answer's indices become raw ids once, in the response.
  recommend_many       scores many queries with one `Recommender.top_k` call per kind (what Serve batches).
  build_fastapi_app    the routes. The Ray Serve replica (ray_serve.py) and the plain app (`build_plain_app`,
                       `raysparse serve --plain`, the baseline of `raysparse bench serve`) run this same code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Literal, Sequence, Union

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from raysparse.errors import ConfigError, UnknownIdError, UserError
from raysparse.recommender import MAX_K, Recommender, no_text_tower_message
from raysparse.serve_config import ServeConfig

log = logging.getLogger("raysparse.serve")

MAX_TEXT_CHARS = 20_000      # longer texts are refused before tokenizing (the model reads max_length tokens)
MAX_IDS_PER_LIST = 10_000    # history / exclude lists
ENDPOINTS = "POST /recommend, GET /items/{item_id}, GET /healthz, GET /docs"
EXAMPLE_BODY = '{"user_id": "u042", "k": 10}'


# ---------------------------------------------------------------------------------------------------------
# The loaded model


def check_artifact(path: str | Path) -> str:
    """Absolute path of an artifact directory, or a UserError saying what to point at instead."""
    path = Path(path).expanduser().resolve()
    if not (path / "format.json").is_file():
        raise UserError(f"--artifact {str(path)!r} is not a raysparse artifact (no format.json); point to the "
                        f"directory written by `raysparse train` (<output>/artifact).")
    return str(path)


def artifact_token(path: str | Path) -> str:
    """Short id of an artifact's contents as written: path + size and mtime of its files. An artifact retrained
    in place gets a new token, so deploying it again reloads it."""
    path = Path(path)
    parts = [str(path.resolve())]
    for name in sorted(os.listdir(path)):
        stat = (path / name).stat()
        parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _column(table: Any, name: str, n: int) -> list | None:
    if table is None or name not in getattr(table, "columns", ()):
        return None
    values = table[name].tolist()
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in values][:n]


def _keep_eval_mode(model: Any) -> None:
    """Make train()/eval() no-ops on a model that only serves.

    Recommender scores inside eval() ... train(was_training) so that a training run can score between epochs;
    each of those walks every submodule (~140 with a BERT), 2-4 ms per request here, more than the scoring
    itself. A served model never trains, so it stays in eval mode and the walk is skipped.
    """
    model.eval()
    model.train = lambda mode=True: model  # instance attribute: shadows nn.Module.train for this object only


@dataclass(frozen=True)
class ServedModel:
    """One loaded artifact plus what responses show about items, and raw id -> index maps for planning."""

    rec: Recommender             # item vectors computed at load
    model_id: str                # artifact_token of what was loaded; every response names it
    artifact: str
    titles: list | None          # (I,) title per item_idx, None where the catalogue has no title
    texts: list | None           # (I,) rendered item text per item_idx
    item_index: dict             # raw item id -> item_idx (a dict: Vocab.lookup builds a pandas Index per call)
    user_index: dict             # raw user id -> user_idx
    item_json: tuple             # (I,) per item_idx: the JSON of its response entry around the score (see `_items_json`)

    @classmethod
    def load(cls, artifact: str | Path, warm_up: bool = True, cache_users: bool = True,
             text_encoder_dtype: str = "auto") -> "ServedModel":
        """text_encoder_dtype: ServeConfig.text_encoder_dtype, applied after the float32 work of loading."""
        artifact = check_artifact(artifact)
        token = artifact_token(artifact)
        rec = Recommender.load(artifact)
        _keep_eval_mode(rec.model)
        if cache_users:  # a warm request is then a matrix product and a top-k; a hot swap loads anew
            start = time.perf_counter()
            rec.cache_known_users()
            log.info("cached %d user vectors in %.1f s", len(rec.users), time.perf_counter() - start)
        text_dtype = rec.set_text_encoder_dtype(text_encoder_dtype)
        if text_dtype is not None:
            log.info("text encoder runs in %s", str(text_dtype).removeprefix("torch."))
        n = len(rec.items)
        titles, texts = _column(rec.item_table, "title", n), _column(rec.item_table, "text", n)
        served = cls(rec, token, artifact, titles, texts,
                     {raw: i for i, raw in enumerate(rec.items.raw_ids)},
                     {raw: i for i, raw in enumerate(rec.users.raw_ids)},
                     _item_json(rec.items.raw_ids, titles, texts))
        if warm_up:  # the first torch call of each shape is slow; pay it before traffic arrives
            if len(rec.users) and cache_users:
                rec.top_k(user_idx=[0], k=1)
                rec.top_k(histories=[[0]], k=1)
            if rec.model.text is not None:
                rec.top_k(texts=["warm up"], k=1)
        return served

    def item_idx(self, raw_ids: Sequence) -> list[int]:
        """item_idx per raw id, -1 for unknown ids (misses go through Vocab.lookup: "42" names item 42)."""
        idx = [self.item_index.get(r, -1) if isinstance(r, (str, int)) else -1 for r in raw_ids]
        if -1 in idx:
            idx = [int(i) for i in self.rec.items.lookup(list(raw_ids))]
        return idx

    def user_idx(self, raw_id: Any) -> int:
        """user_idx of a raw id, -1 for an unknown user (misses go through Vocab.lookup, as for items)."""
        idx = self.user_index.get(raw_id, -1) if isinstance(raw_id, (str, int)) else -1
        return idx if idx >= 0 else int(self.rec.users.lookup([raw_id])[0])

    @property
    def n_items(self) -> int:
        return len(self.rec.items)

    @property
    def has_text(self) -> bool:
        return self.rec.model.text is not None

    def describe(self) -> dict:
        text_dtype = (str(next(self.rec.model.text.encoder.parameters()).dtype).removeprefix("torch.")
                      if self.has_text else None)
        return {"model_id": self.model_id, "artifact": Path(self.artifact).name, "items": self.n_items,
                "users": len(self.rec.users), "text_tower": self.has_text, "text_encoder_dtype": text_dtype,
                "max_length": int(self.rec.config.data.max_length), "variant": self.rec.config.model.variant}


# ---------------------------------------------------------------------------------------------------------
# Request / response schemas (also the OpenAPI page at /docs)

RawId = Union[StrictStr, StrictInt]
QueryPath = Literal["warm", "fold_in", "text"]


class RecommendRequest(BaseModel):
    """Send exactly one of: `user_id` (known user), `history` (new user, fold-in), `user_id` + `history`
    (known user with new interactions), or `text` (user with no history)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"user_id": "u042", "k": 10}, {"history": ["i007", "i311"], "k": 10},
        {"user_id": "u042", "history": ["i512"], "exclude": ["i007"]}, {"text": "space opera with robots"}]})

    user_id: RawId | None = Field(None, description="A user known at training time.")
    history: list[RawId] | None = Field(None, max_length=MAX_IDS_PER_LIST,
                                        description="Item ids the user interacted with, oldest first. With "
                                                    "user_id: interactions newer than training.")
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS,
                             description="Free text describing a user with no history (needs a text tower).")
    k: int = Field(10, ge=1, le=MAX_K, description="How many items to return.")
    exclude_seen: bool = Field(True, description="Leave out items in the user's training history and `history`.")
    exclude: list[RawId] = Field(default_factory=list, max_length=MAX_IDS_PER_LIST,
                                 description="Item ids to leave out as well.")


class RecommendedItem(BaseModel):
    item_id: Union[str, int]
    score: float
    title: str | None = None
    text: str | None = None


class RecommendResponse(BaseModel):
    path: QueryPath = Field(description="warm: a known user; fold_in: a user vector "
                                                                 "from the given history; text: from `text`.")
    items: list[RecommendedItem]
    model_id: str = Field(description="Which loaded artifact answered (changes on a hot swap).")
    notes: list[str] = Field(default_factory=list, description="E.g. that a long text was truncated.")


class FieldError(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong and what to send instead.")
    errors: list[FieldError] = Field(default_factory=list)
    unknown: list[Union[str, int]] = Field(default_factory=list, description="Ids not in the training data.")


class ApiError(Exception):
    """An error with its HTTP status; `detail` says what to send instead."""

    def __init__(self, status: int, detail: str, headers: dict | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers, extra

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail, **self.extra}, status_code=self.status, headers=self.headers)


FIELD_HINTS = {
    "user_id": 'send the user\'s id as a string or an integer, e.g. "user_id": "u042"',
    "history": 'send a list of item ids (strings or integers), oldest first, e.g. "history": ["i007", "i311"]',
    "text": f"send a non-empty string of at most {MAX_TEXT_CHARS} characters describing the user's interests",
    "k": f'send an integer in [1, {MAX_K}], e.g. "k": 10',
    "exclude_seen": 'send true or false, e.g. "exclude_seen": false',
    "exclude": 'send a list of item ids to leave out, e.g. "exclude": ["i007"]',
}


def _validation_error(err: RequestValidationError) -> ApiError:
    """pydantic / JSON errors -> one 422 whose message names each bad field and what to send instead."""
    fields: dict[str, str] = {}
    for e in err.errors():
        loc = [str(x) for x in e.get("loc", ())]
        kind = e.get("type", "")
        name = loc[1] if len(loc) > 1 and loc[0] == "body" else ".".join(loc) or "body"
        if kind == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", "invalid JSON")
            position = f" at character {loc[1]}" if len(loc) > 1 else ""
            return ApiError(422, f"the request body is not valid JSON ({reason}{position}); send a JSON object "
                                 f"such as {EXAMPLE_BODY}.", errors=[{"field": "body", "message": reason}])
        if len(loc) == 1 or name == "body":
            got = e.get("input")
            if kind == "missing":
                message = f"the request needs a JSON object body, e.g. {EXAMPLE_BODY}"
            elif isinstance(got, (bytes, str)):
                message = (f"the body was not read as JSON; send a JSON object such as {EXAMPLE_BODY} with the "
                           f"header Content-Type: application/json")
            else:
                message = f"the body must be a JSON object, got a {_json_type(got)}; send e.g. {EXAMPLE_BODY}"
            return ApiError(422, message + ".", errors=[{"field": "body", "message": e.get("msg", "")}])
        if kind == "extra_forbidden":
            fields[name] = (f"unknown field {name!r}; send only "
                            f"{', '.join(RecommendRequest.model_fields)}")
        elif name not in fields:
            got = e.get("input")
            shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
            where = name + "".join(f"[{x}]" for x in loc[2:] if x.isdigit())
            fields[name] = f"{where}={shown} is invalid ({e.get('msg', kind)}); {FIELD_HINTS.get(name, 'see /docs')}"
    detail = "; ".join(fields.values()) or "invalid request; see /docs for the request schema"
    return ApiError(422, detail + ".", errors=[{"field": k, "message": v} for k, v in fields.items()])


def _json_type(value: Any) -> str:
    return {list: "list", dict: "object", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------------------
# Planning and scoring (the Serve replica batches `recommend_many` across clients)

@dataclass(frozen=True)
class Query:
    """One checked request, in the terms of `Recommender.top_k`: ids are already indices (`*_idx`)."""

    path: QueryPath
    k: int
    exclude_seen: bool = True
    exclude: tuple = ()          # item_idx to leave out
    user_idx: int = -1           # warm
    history: tuple = ()          # item_idx; warm (new interactions) and fold_in; oldest first
    text: str | None = None      # text

    def group(self) -> tuple:
        """Queries of one group share one `Recommender.top_k` call."""
        return (self.path, self.exclude_seen)


QueryResult = Union[list, Exception]               # [(item_idx, score)] best first, or the error of that query
QueryRunner = Callable[[Query], Awaitable[QueryResult]]


def recommend_many(served: ServedModel, queries: Sequence[Query]) -> list[QueryResult]:
    """Top-k for many queries with one `Recommender.top_k` call per group (path, exclude_seen).

    Queries of a group differ in k and `exclude`; the call asks for the longest list any of them needs
    (k + |exclude|) and each query drops its excluded items, then keeps its first k. That equals excluding
    first: removing items from a longer top list cannot promote an item ranked below it. A group of one, and a
    query whose k + |exclude| exceeds what one call may return, call `top_k` with their own k and exclude.
    If a group's call fails, its queries run one by one, so one bad query cannot fail the others.
    """
    rec = served.rec
    limit = min(MAX_K, served.n_items)
    results: list[QueryResult | None] = [None] * len(queries)
    groups: dict[tuple, list[int]] = {}
    for i, q in enumerate(queries):
        if len(queries) > 1 and q.k + len(q.exclude) <= limit:
            groups.setdefault(q.group(), []).append(i)
        else:
            results[i] = _one(rec, q)
    for members in groups.values():
        if len(members) == 1:
            results[members[0]] = _one(rec, queries[members[0]])
            continue
        group = [queries[i] for i in members]
        need = max(q.k + len(q.exclude) for q in group)
        try:
            rows = rec.top_k(**_batch_kwargs(group), k=need, exclude_seen=group[0].exclude_seen)
        except Exception:
            for i in members:
                results[i] = _one(rec, queries[i])
            continue
        for i, q, row in zip(members, group, rows):
            drop = set(q.exclude)
            results[i] = [(idx, score) for idx, score in row if idx not in drop][:q.k]
    return results  # type: ignore[return-value]


def _batch_kwargs(group: Sequence[Query]) -> dict:
    path = group[0].path
    if path == "text":
        return {"texts": [q.text for q in group]}
    histories = [list(q.history) for q in group]
    if path == "fold_in":
        return {"histories": histories}
    return {"user_idx": [q.user_idx for q in group], "histories": histories if any(histories) else None}


def _one(rec: Recommender, q: Query) -> QueryResult:
    kwargs = _batch_kwargs([q])
    try:
        return rec.top_k(**kwargs, k=q.k, exclude_seen=q.exclude_seen, exclude=list(q.exclude) or None)[0]
    except Exception as err:  # returned, not raised: the caller of this one query raises it
        return err


def _unknown_items_error(field_name: str, unknown: list, served: ServedModel) -> ApiError:
    shown = unknown[:20]
    more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
    return ApiError(422, f"unknown item id(s) in {field_name}: {shown!r}{more}; they are not in the "
                         f"{served.n_items}-item catalogue the model was trained on (ids look like "
                         f"{served.rec.items.raw_ids[0]!r}). Drop them and send the rest.", unknown=unknown)


def _known_items(served: ServedModel, field_name: str, ids: list) -> tuple:
    """item_idx of `ids` ("42" names item 42 in an integer vocabulary); a 422 listing the unknown ones."""
    idx = served.item_idx(ids)
    unknown = [ids[j] for j, v in enumerate(idx) if v < 0]
    if unknown:
        raise _unknown_items_error(field_name, unknown, served)
    return tuple(idx)


def plan_query(served: ServedModel, req: RecommendRequest) -> tuple[Query, list[str]]:
    """Check a request against the model: (query, notes), or an ApiError that says what to send instead.
    The one place where a request's raw ids become indices."""
    notes: list[str] = []
    if req.text is not None and (req.user_id is not None or req.history is not None):
        raise ApiError(422, "send text alone, or user_id and/or history; not text together with them.")
    if req.text is None and req.user_id is None and req.history is None:
        raise ApiError(422, 'nothing to recommend for: send "user_id" (a known user), "history" (item ids, '
                            'oldest first) or "text" (a description); e.g. ' + EXAMPLE_BODY + ".")
    if req.k > min(MAX_K, served.n_items):
        raise ApiError(422, f"k={req.k} is more than the {served.n_items} items in the catalogue; send "
                            f"k <= {min(MAX_K, served.n_items)}.")
    exclude = _known_items(served, "exclude", req.exclude) if req.exclude else ()
    common = {"k": req.k, "exclude_seen": req.exclude_seen, "exclude": exclude}
    if req.text is not None:
        return Query("text", text=_check_text(served, req.text, notes), **common), notes
    history = _known_items(served, "history", req.history) if req.history else ()
    user_idx = served.user_idx(req.user_id) if req.user_id is not None else -1
    if user_idx >= 0:
        return Query("warm", user_idx=user_idx, history=history, **common), notes
    if req.user_id is not None and not history:
        raise ApiError(404, f"user_id {req.user_id!r} is not a user known at training; send their history "
                            f'(item ids, oldest first: {{"history": ["i007", "i311"]}}) for a fold-in '
                            f'recommendation, or a text describing their interests ({{"text": "..."}}).',
                       unknown=[req.user_id])
    if not history:
        raise ApiError(422, 'history is empty; send at least one item id, oldest first (e.g. "history": '
                            '["i007"]), or a text instead.')
    if req.user_id is not None:
        notes.append(f"user_id {req.user_id!r} is not known at training; recommended from the history alone "
                     f"(fold-in).")
    return Query("fold_in", history=history, **common), notes


def _check_text(served: ServedModel, text: str, notes: list[str]) -> str:
    if not text.strip():
        raise ApiError(422, 'text is empty; send a non-empty description of the user\'s interests, e.g. '
                            '"text": "space opera with robots", or a history instead.',
                       errors=[{"field": "text", "message": "empty"}])
    if not served.has_text:
        raise ApiError(422, no_text_tower_message(served.rec.config.model.variant))
    max_length = int(served.rec.config.data.max_length)
    n_tokens = len(served.rec.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])
    if n_tokens > max_length:
        notes.append(f"text has {n_tokens} tokens; the model read the first {max_length} (data.max_length) and "
                     f"ignored the rest.")
    return text


def _dumps(value: Any) -> str:
    """JSON the way FastAPI's JSONResponse writes it (compact, UTF-8 kept)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _item_json(raw_ids: Sequence, titles: list | None, texts: list | None) -> tuple:
    """Per item_idx, the JSON of its `RecommendedItem` split around the score: ('{"item_id":..,"score":',
    ',"title":..,"text":..}'). Encoded once at load, so a response only writes its scores (see `_response`)."""
    out = []
    for i, raw in enumerate(raw_ids):
        raw = raw.item() if hasattr(raw, "item") else raw
        out.append((f'{{"item_id":{_dumps(raw)},"score":',
                    f',"title":{_dumps(titles[i] if titles else None)},"text":{_dumps(texts[i] if texts else None)}}}'))
    return tuple(out)


def _response(served: ServedModel, path: str, ranked: list[tuple[int, float]], notes: list[str]) -> Response:
    """The `RecommendResponse` JSON, written from the item entries encoded at load: the one place where an
    answer's indices become raw ids. Equal to what FastAPI's validate-then-encode of the same dict gives (tested),
    at a fraction of its cost (it was ~40% of a warm request's server time). Scores are finite here (top_k drops
    -inf) and repr(float) is what json.dumps writes, so a client reads back the identical float."""
    entries = served.item_json
    items = ",".join(f"{entries[i][0]}{float(score)!r}{entries[i][1]}" for i, score in ranked)
    body = (f'{{"path":"{path}","items":[{items}],"model_id":{_dumps(served.model_id)},'
            f'"notes":{_dumps(notes)}}}')
    return Response(body.encode(), media_type="application/json")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    elif hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


@contextmanager
def _errors_as_responses() -> Iterator[None]:
    """Bad input that slipped past the checks above still becomes a 4xx; anything else a 500 without a trace."""
    try:
        yield
    except ApiError:
        raise
    except UnknownIdError as err:
        raise ApiError(422, f"{err}; drop them and send the rest.", unknown=list(err.unknown)) from err
    except UserError as err:
        raise ApiError(422, str(err)) from err
    except Exception as err:
        log.exception("request failed")
        raise ApiError(500, f"internal error ({type(err).__name__}); the server log has the details.") from err


# ---------------------------------------------------------------------------------------------------------
# The HTTP app


class ServerTiming:
    """ASGI middleware: every response carries `Server-Timing: app;dur=<ms>`, the time from the request entering
    the app to its response starting (request parsing, checks, scoring, encoding; not the network, not uvicorn's
    or Serve's proxy). `raysparse bench serve` reads it beside the client's end-to-end time. Plain ASGI, not
    Starlette's BaseHTTPMiddleware, which would add its own task and stream per request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                dur_ms = (time.perf_counter() - start) * 1e3
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"server-timing", f"app;dur={dur_ms:.3f}".encode())]}
            await send(message)

        await self.app(scope, receive, timed_send)


def server_time_ms(headers: Any) -> float | None:
    """The app's time in ms from a response's Server-Timing header (see `ServerTiming`); None without one."""
    value = headers.get("server-timing", "")
    for part in value.split(","):
        name, _, rest = part.strip().partition(";")
        if name == "app" and rest.startswith("dur="):
            return float(rest[4:])
    return None


def build_fastapi_app(get_model: Callable[[], ServedModel | None], run_query: QueryRunner | None = None) -> FastAPI:
    """The API. `get_model()` is the model to answer with (None while loading); `run_query` scores one checked
    query, maybe batched with other clients' (default: alone, via `recommend_many` in a worker thread)."""
    app = FastAPI(title="raysparse", version="1", description=(
        "Recommendations from a hybrid BERT + Deep Matrix Factorization model. Every error response says "
        "what to send instead."))
    app.add_middleware(ServerTiming)
    error_responses: dict = {404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}

    def current() -> ServedModel:
        served = get_model()
        if served is None:
            raise ApiError(503, "the model is still loading; retry in a few seconds.")
        return served

    async def alone(query: Query) -> QueryResult:
        if query.path != "text":
            # Warm and fold-in take ~0.1-0.5 ms: less than a worker-thread hand-off costs, so they run on the loop.
            return recommend_many(current(), [query])[0]
        # An encoder pass (~10 ms) goes to a thread, so the loop keeps answering other requests meanwhile.
        return (await run_in_threadpool(recommend_many, current(), [query]))[0]

    score = run_query or alone

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code in (404, 405):
            what = "no such route" if err.status_code == 404 else "method not allowed"
            return JSONResponse({"detail": f"{what}: {request.method} {request.url.path}; the API has "
                                           f"{ENDPOINTS}."}, status_code=err.status_code)
        return JSONResponse({"detail": str(err.detail)}, status_code=err.status_code)

    @app.post("/recommend", response_model=RecommendResponse, responses=error_responses,
              summary="Top-k items for a known user, a history (fold-in) or a text.")
    async def recommend(req: RecommendRequest) -> Response:
        with _errors_as_responses():
            served = current()
            query, notes = plan_query(served, req)
            result = await score(query)
            if isinstance(result, Exception):
                raise result
            return _response(served, query.path, result, notes)

    @app.get("/items/{item_id}", responses=error_responses, summary="One catalogue row (title, text, ...).")
    async def item(item_id: str) -> dict:
        with _errors_as_responses():
            served = current()
            idx = served.item_idx([item_id])[0]
            if idx < 0:
                raise ApiError(404, f"item_id {item_id!r} is not in the {served.n_items}-item catalogue; ids look "
                                    f"like {served.rec.items.raw_ids[0]!r}.", unknown=[item_id])
            return {"item_id": served.rec.items.raw_ids[idx], **_jsonable(served.rec.item_row(idx)),
                    "model_id": served.model_id}

    @app.get("/healthz", summary="Liveness, and which model is loaded.")
    async def healthz() -> dict:
        return {"status": "ok", **current().describe()}

    return app


def build_plain_app(artifact: str | Path, torch_threads: int | None = None,
                    text_encoder_dtype: str = "auto") -> FastAPI:
    """The same API without Ray: one process, no replicas, no batching, no hot swap. The benchmark's baseline,
    and a way to serve where Ray is not installed (`raysparse serve --plain`)."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    served = ServedModel.load(artifact, text_encoder_dtype=text_encoder_dtype)
    return build_fastapi_app(lambda: served)


def run_plain(artifact: str | Path, config: ServeConfig) -> None:
    """Serve `build_plain_app` with uvicorn on config.host:port until interrupted."""
    if config.route_prefix != "/":
        raise ConfigError(f"serve.route_prefix={config.route_prefix!r} is not supported without Ray; serve at '/' "
                          f"(drop --route-prefix) or drop --plain.")
    app = build_plain_app(artifact, config.torch_threads, config.text_encoder_dtype)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info" if config.access_log else "warning",
                access_log=config.access_log)

