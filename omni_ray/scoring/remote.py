"""A remote reward endpoint as a scorer (type ``http``): batches POSTed as JSON to one configured URL.

Protocol (one request per batch of at most ``batch_size`` items)::

    POST <url>
    Content-Type: application/json
    Authorization: Bearer <token>          (only when token_env is configured)

    {"prompts": ["1+2=", ...], "responses": ["3", ...],
     "references": ["3", ...],             (omitted when no item has a reference)
     "<column>": [...], ...}               (each of data.extra_columns, by its name)

    200 OK
    {"scores": [9.5, null, ...],           one number per item, in order; null = no score (becomes NaN)
     "correct": [true, false, ...]}        optional: one answer check per item

The scores are on the scale the config declares (``scale_low`` / ``scale_high``); the server is not asked for it.

Failure handling, so a round either gets every score or stops with a clear error (never hangs, never guesses),
through urllib3's ``Retry``:

- every request has a connect/read timeout (``timeout_s``);
- transient failures are retried ``retries`` times with exponential backoff (``backoff_s`` doubling per retry,
  capped at ``backoff_max_s``; a ``Retry-After`` header replaces the backoff of that retry, capped the same):
  connection errors, timeouts, HTTP 408, 429 and 5xx;
- everything else is permanent and raises at once: other 4xx (401/403: bad token), a 200 whose body is not
  ``{"scores": [...]}`` with exactly one number (or null) per item, and any redirect;
- after the last retry :class:`RemoteScorerError` names the endpoint, the batch, the attempts and the last error.

Safety:

- The bearer token is read from the environment variable *named* in config (``token_env``), at construction, in the
  process that scores. The config, its dumps, ``repr`` / ``name`` and error messages never contain it, and pickling
  the scorer drops it (it is re-read from the environment on unpickling).
- Only the configured URL is contacted: redirects are refused, not followed, and urllib3 reads no proxy or netrc
  settings from the environment, so neither the request nor the token goes anywhere else. URLs with
  ``user:password@`` are refused (use ``token_env``); the query string is redacted from names and messages.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from omni_ray.scoring.base import Scorer, ScoreResult, check_inputs, check_range, register_scorer

__all__ = ["RETRY_STATUS", "HttpScorer", "RemoteScorerError", "backoff_delay", "redact_url"]

log = logging.getLogger(__name__)

#: HTTP statuses worth retrying: request timeout, rate limit, server-side errors (500-599).
RETRY_STATUS: frozenset[int] = frozenset({408, 429, *range(500, 600)})

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BODY_SNIPPET = 200
_DEFAULT_BATCH_SIZE = 64
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RemoteScorerError(RuntimeError):
    """A remote scorer request failed for good (after its retries, or at once for a permanent error)."""


def backoff_delay(retry: int, *, base: float, cap: float) -> float:
    """Delay before retry number ``retry`` (1-based): ``base * 2**(retry-1)``, capped at ``cap``. Deterministic."""
    if retry < 1:
        raise ValueError(f"retry numbers start at 1, got {retry}")
    return float(min(cap, base * 2.0 ** (retry - 1)))


def redact_url(url: str) -> str:
    """``url`` without credentials, query and fragment (what names and error messages show)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@functools.cache
def _retry_class() -> type:
    """urllib3's ``Retry`` with this module's backoff (defined on first use: urllib3 is imported when scoring)."""
    from urllib3.util.retry import Retry

    class _Retry(Retry):
        # Retry-After makes only the statuses retried here retryable (urllib3 would add 413 when it is present).
        RETRY_AFTER_STATUS_CODES = frozenset()

        def get_backoff_time(self) -> float:
            # urllib3 waits 0 s before the first retry; here the first retry already waits backoff_s.
            return backoff_delay(max(1, len(self.history)), base=self.backoff_factor, cap=self.backoff_max)

        def get_retry_after(self, response: Any) -> float | None:
            seconds = super().get_retry_after(response)
            return None if seconds is None else min(seconds, self.backoff_max)

    return _Retry


def _retry_policy(retries: int, backoff_s: float, backoff_max_s: float) -> Any:
    """The ``Retry`` of one batch request, with the module docstring's rules."""
    return _retry_class()(
        total=retries,
        redirect=False,
        status_forcelist=RETRY_STATUS,
        allowed_methods=None,  # POST too: a scoring request has no side effects
        backoff_factor=backoff_s,
        backoff_max=backoff_max_s,
        raise_on_status=False,  # the last answer comes back, so the error can show what the server said
    )


class HttpScorer(Scorer):
    """Scores by POSTing ``{"prompts", "responses", ...}`` batches to ``url`` (protocol in the module docstring).

    Args:
        url: the endpoint, ``http://`` or ``https://``; no credentials in it.
        scale: the declared range of the endpoint's scores.
        token_env: name of the environment variable holding a bearer token ("" = no auth header). A configured
            variable that is unset or empty raises ValueError naming the variable.
        timeout_s: connect and read timeout of each request (not a bound on a whole slow-dripping response).
        retries: retries after the first attempt of a batch (0 = one attempt only).
        backoff_s / backoff_max_s: first retry delay (doubled per retry) and its cap.
        batch_size: items per request.
        name: scorer name (default ``http:<redacted url>``).
    """

    def __init__(
        self,
        url: str,
        *,
        scale: tuple[float, float],
        token_env: str = "",
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        batch_size: int = _DEFAULT_BATCH_SIZE,
        name: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"http scorer url must be http:// or https:// with a host, got {redact_url(url)!r}")
        if parts.username or parts.password:
            raise ValueError("http scorer url must not carry credentials (user:password@); use token_env instead")
        if token_env and not _ENV_NAME.fullmatch(token_env):
            raise ValueError("token_env must be the NAME of an environment variable, not a token (value not shown)")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be finite and > 0, got {timeout_s!r}")
        if retries < 0 or batch_size < 1 or backoff_s < 0 or backoff_max_s < 0:
            raise ValueError(
                f"need retries >= 0, batch_size >= 1, backoff_s >= 0, backoff_max_s >= 0; got {retries=}, "
                f"{batch_size=}, {backoff_s=}, {backoff_max_s=}"
            )
        self.url = url
        self.display_url = redact_url(url)
        self.scale = check_range(f"http scorer {self.display_url} scale", scale)
        self.token_env = token_env
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.batch_size = int(batch_size)
        self.name = name or f"http:{self.display_url}"
        #: Counters over this scorer's life: requests sent, retries made, batches that failed for good.
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "failed_batches": 0}
        self._token = self._read_token()
        self._pool: Any = None
        if parts.scheme == "http" and self._token and parts.hostname not in _LOOPBACK:
            log.warning("%s: sending a bearer token over plain http to a non-loopback host", self.name)

    # -- secrets -------------------------------------------------------------------------------------------------

    def _read_token(self) -> str:
        if not self.token_env:
            return ""
        token = os.environ.get(self.token_env, "")
        if not token:
            raise ValueError(
                f"{self.name}: token_env names the environment variable {self.token_env!r}, which is unset or empty "
                "in this process; the scoring actor needs it in its environment (set it on the Ray nodes, e.g. from "
                "a Kubernetes secret, rather than in a runtime_env, which Ray records and shows)"
            )
        return token

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_token"] = ""  # never serialized: re-read from the environment where the scorer is unpickled
        state["_pool"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._token = self._read_token()

    def __repr__(self) -> str:
        auth = f", token_env={self.token_env!r}" if self.token_env else ""
        return f"HttpScorer(url={self.display_url!r}, scale={self.scale}{auth})"

    # -- requests ------------------------------------------------------------------------------------------------

    def _post(self, body: bytes, where: str) -> Any:
        """One batch through urllib3 with its retries; the JSON body of the 200 answer, or RemoteScorerError."""
        import urllib3

        if self._pool is None:
            self._pool = urllib3.PoolManager()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        attempts = self.retries + 1
        try:
            resp = self._pool.request(
                "POST",
                self.url,
                body=body,
                headers=headers,
                timeout=urllib3.Timeout(connect=self.timeout_s, read=self.timeout_s),
                retries=_retry_policy(self.retries, self.backoff_s, self.backoff_max_s),
                redirect=False,
            )
        except urllib3.exceptions.MaxRetryError as e:
            self.stats["requests"] += attempts
            self.stats["retries"] += self.retries
            reason = e.reason
            # NewConnectionError (refused, unresolvable) is a ConnectTimeoutError subclass in urllib3: tested first.
            if isinstance(reason, urllib3.exceptions.TimeoutError) and not isinstance(
                reason, urllib3.exceptions.NewConnectionError
            ):
                last = f"timed out after {self.timeout_s:g} s ({type(reason).__name__})"
            else:
                last = f"connection failed ({type(reason).__name__})"
            message = f"{where} failed after {attempts} attempt(s) ({self.retries} retries); last error: {last}"
            raise self._failed(message) from None
        except urllib3.exceptions.HTTPError as e:
            self.stats["requests"] += 1
            raise self._failed(f"{where}: request failed ({type(e).__name__}: {e})") from None
        retried = len(resp.retries.history) if resp.retries is not None else 0
        self.stats["requests"] += retried + 1
        self.stats["retries"] += retried
        status = int(resp.status)
        if 300 <= status < 400:
            target = redact_url(resp.headers.get("Location", "")) or "(no Location)"
            raise self._failed(
                f"the server answered {status} redirecting to {target}; redirects are not followed "
                "(the scorer only talks to the configured URL): configure the final URL"
            )
        if status != 200:
            snippet = resp.data[:_BODY_SNIPPET].decode(errors="replace").strip()
            message = f"HTTP {status}" + (f": {snippet}" if snippet else "")
            if status in RETRY_STATUS:
                raise self._failed(
                    f"{where} failed after {retried + 1} attempt(s) ({retried} retries); last error: {message}"
                )
            hint = " (check the token in $" + self.token_env + ")" if status in (401, 403) and self.token_env else ""
            raise self._failed(f"permanent error {message}{hint}")
        if retried:
            log.warning("%s: %s needed %d retries", self.name, where, retried)
        try:
            return json.loads(resp.data)
        except ValueError:
            raise self._failed(
                f'the response is not JSON: {resp.data[:_BODY_SNIPPET]!r}; expected {{"scores": [...]}}'
            ) from None

    def _failed(self, message: str) -> RemoteScorerError:
        self.stats["failed_batches"] += 1
        return RemoteScorerError(f"{self.name}: {message}")

    def _parse_answer(self, body: Any, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(scores, correct flags or None) of one batch's JSON answer, checked item by item."""
        if not isinstance(body, dict) or not isinstance(body.get("scores"), list):
            shown = sorted(body) if isinstance(body, dict) else type(body).__name__
            raise self._failed(f'expected a JSON object {{"scores": [...]}}, got {shown}')
        scores = body["scores"]
        if len(scores) != n:
            raise self._failed(f"sent {n} (prompt, response) items but got {len(scores)} scores")
        out = np.empty(n, dtype=np.float64)
        for i, v in enumerate(scores):
            if v is None:
                out[i] = math.nan
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[i] = float(v)
            else:
                raise self._failed(f"score {i} is {v!r}; scores must be numbers or null")
        flags = body.get("correct")
        if flags is None:
            return out, None
        if not isinstance(flags, list) or len(flags) != n:
            got = len(flags) if isinstance(flags, list) else type(flags).__name__
            raise self._failed(f'"correct" must be a list of {n} true/false values, got {got}')
        bad = [i for i, v in enumerate(flags) if not isinstance(v, bool)]
        if bad:
            raise self._failed(f'"correct"[{bad[0]}] is {flags[bad[0]]!r}; expected true or false')
        return out, np.asarray(flags, dtype=bool)

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        references: Sequence[str | None] | None = None,
        **columns: Sequence[Any],
    ) -> ScoreResult:
        """One score per response, in order; batches of ``batch_size`` are sent one after the other, each with its
        items' references (unless none has one) and extra columns."""
        prompts, responses = [str(p) for p in prompts], [str(r) for r in responses]
        check_inputs(prompts, responses)
        n = len(responses)
        row_data: dict[str, Sequence[Any]] = dict(columns)
        if references is not None and any(r is not None for r in references):
            row_data = {"references": references, **row_data}
        for key, values in row_data.items():
            if len(values) != n:
                raise ValueError(f"{self.name}: {key!r} has {len(values)} values for {n} responses")
        scores = np.empty(n, dtype=np.float64)
        flags: list[np.ndarray | None] = []
        n_batches = -(-n // self.batch_size)
        for b, start in enumerate(range(0, n, self.batch_size)):
            stop = min(n, start + self.batch_size)
            where = f"batch {b + 1}/{n_batches} (items {start}-{stop - 1})"
            payload = {"prompts": prompts[start:stop], "responses": responses[start:stop]}
            payload.update({k: list(v[start:stop]) for k, v in row_data.items()})
            answer = self._post(_encoded(self.name, payload), where)
            scores[start:stop], batch_flags = self._parse_answer(answer, stop - start)
            flags.append(batch_flags)
        return ScoreResult(scores=scores, correct=_joined_flags(self.name, flags), scale=self.scale)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        if self._pool is not None:
            self._pool.clear()
            self._pool = None


def _encoded(name: str, payload: Mapping[str, Any]) -> bytes:
    """The request body; a ValueError names the first column whose values are not JSON."""
    try:
        return json.dumps(payload).encode()
    except (TypeError, ValueError):
        for key, values in payload.items():
            try:
                json.dumps(values)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}: column {key!r} cannot be sent as JSON ({e})") from None
        raise


def _joined_flags(name: str, flags: list[np.ndarray | None]) -> np.ndarray | None:
    """The batches' correct flags as one array; None when no batch sent any; an error when only some did."""
    if all(f is None for f in flags):
        return None
    if any(f is None for f in flags):
        missing = [i + 1 for i, f in enumerate(flags) if f is None]
        raise RemoteScorerError(f'{name}: batches {missing} answered without "correct" flags while others had them')
    return np.concatenate(flags) if flags else None


@register_scorer("http")
def _http(spec: Any, *, scale: tuple[float, float], where: str, **_: Any) -> HttpScorer:
    if not spec.url:
        raise ValueError(f"{where}.url: an http scorer needs an endpoint URL")
    return HttpScorer(
        spec.url,
        scale=scale,
        token_env=spec.token_env,
        timeout_s=spec.timeout_s,
        retries=spec.retries,
        backoff_s=spec.backoff_s,
        backoff_max_s=spec.backoff_max_s,
        batch_size=spec.batch_size or _DEFAULT_BATCH_SIZE,
    )
