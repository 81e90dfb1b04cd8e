"""A remote reward endpoint as a scorer: (prompt, response) batches POSTed as JSON to one configured URL.

Protocol (one request per batch of at most ``batch_size`` items)::

    POST <url>
    Content-Type: application/json
    Authorization: Bearer <token>          (only when token_env is configured)

    {"prompts": ["1+2=", ...], "responses": ["3", ...]}

    200 OK
    {"scores": [9.5, null, ...]}           one number per item, in order; null = no score (becomes NaN)

The scores are on the scale the config declares (``scale_low`` / ``scale_high``); the server is not asked for it.

Failure handling, so a round either gets every score or stops with a clear error (never hangs, never guesses):

- every request has a connect/read timeout (``timeout_s``);
- transient failures are retried ``retries`` times with exponential backoff (``backoff_s`` doubling per retry,
  capped at ``backoff_max_s``; a ``Retry-After`` header in seconds is honoured up to the same cap): connection
  errors, timeouts, HTTP 408, 429 and 5xx;
- everything else is permanent and raises at once: other 4xx (401/403: bad token), a 200 whose body is not
  ``{"scores": [...]}`` with exactly one number (or null) per item, and any redirect;
- after the last retry :class:`RemoteScorerError` names the endpoint, the batch, the attempts and the last error.

Safety (issue #6):

- The bearer token is read from the environment variable *named* in config (``token_env``), at construction, in the
  process that scores. The config, its dumps, ``repr`` / ``name`` and error messages never contain it, and pickling
  the scorer drops it (it is re-read from the environment on unpickling).
- Only the configured URL is contacted: redirects are refused, not followed (``allow_redirects=False``), and the
  session ignores proxy / netrc settings from the environment (``trust_env=False``), so neither the request nor the
  token goes anywhere else. URLs with ``user:password@`` are refused (use ``token_env``); the query string is
  redacted from names and messages.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from omni_ray.scoring.scorers import Scorer, ScoreResult, _as_range, _check_inputs

__all__ = ["RETRY_STATUS", "HttpScorer", "RemoteScorerError", "backoff_delay", "redact_url"]

log = logging.getLogger(__name__)

#: HTTP statuses worth retrying: request timeout, rate limit, server-side errors (500-599).
RETRY_STATUS: frozenset[int] = frozenset({408, 429, *range(500, 600)})

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BODY_SNIPPET = 200


class RemoteScorerError(RuntimeError):
    """A remote scorer request failed for good (after its retries, or at once for a permanent error)."""


class _Transient(Exception):
    """A failure worth retrying (internal)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class HttpScorer(Scorer):
    """Scores by POSTing ``{"prompts", "responses"}`` batches to ``url`` (protocol in the module docstring).

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
        batch_size: int = 64,
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
        self.scale = _as_range(f"http scorer {self.display_url} scale", scale)
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
        self._session: Any = None
        if parts.scheme == "http" and self._token and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning("%s: sending a bearer token over plain http to a non-loopback host", self.name)

    @classmethod
    def from_spec(cls, spec: Any, *, scale: tuple[float, float], where: str = "http scorer") -> HttpScorer:
        """From a ``ScorerSpec`` of type ``http`` (``url``, ``token_env``, ``timeout_s``, ``retries``, ...)."""
        if not spec.url:
            raise ValueError(f"{where}.url: an http scorer needs an endpoint URL")
        return cls(
            spec.url,
            scale=scale,
            token_env=spec.token_env,
            timeout_s=spec.timeout_s,
            retries=spec.retries,
            backoff_s=spec.backoff_s,
            backoff_max_s=spec.backoff_max_s,
            batch_size=spec.batch_size or 64,
        )

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
        state["_session"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._token = self._read_token()

    def __repr__(self) -> str:
        auth = f", token_env={self.token_env!r}" if self.token_env else ""
        return f"HttpScorer(url={self.display_url!r}, scale={self.scale}{auth})"

    # -- requests ------------------------------------------------------------------------------------------------

    def _get_session(self) -> Any:
        if self._session is None:
            import requests

            session = requests.Session()
            session.trust_env = False  # no proxies / netrc credentials from the environment: talk to `url` only
            self._session = session
        return self._session

    def _post_once(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """One request; returns the batch's scores or raises _Transient / RemoteScorerError."""
        import requests

        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        self.stats["requests"] += 1
        try:
            resp = self._get_session().post(
                self.url,
                json={"prompts": prompts, "responses": responses},
                headers=headers,
                timeout=(self.timeout_s, self.timeout_s),
                allow_redirects=False,
            )
        except requests.Timeout as e:
            raise _Transient(f"timed out after {self.timeout_s:g} s ({type(e).__name__})") from None
        except requests.ConnectionError as e:
            raise _Transient(f"connection failed ({type(e).__name__})") from None
        with resp:
            status = int(resp.status_code)
            if 300 <= status < 400:
                target = redact_url(resp.headers.get("Location", "")) or "(no Location)"
                raise RemoteScorerError(
                    f"{self.name}: the server answered {status} redirecting to {target}; redirects are not followed "
                    "(the scorer only talks to the configured URL): configure the final URL"
                )
            if status != 200:
                snippet = resp.text[:_BODY_SNIPPET].strip()
                message = f"HTTP {status}" + (f": {snippet}" if snippet else "")
                if status in RETRY_STATUS:
                    raise _Transient(message, _retry_after(resp.headers.get("Retry-After")))
                hint = (
                    " (check the token in $" + self.token_env + ")" if status in (401, 403) and self.token_env else ""
                )
                raise RemoteScorerError(f"{self.name}: permanent error {message}{hint}")
            try:
                body = resp.json()
            except ValueError:
                raise RemoteScorerError(
                    f"{self.name}: the response is not JSON: {resp.text[:_BODY_SNIPPET]!r}; expected "
                    '{"scores": [...]}'
                ) from None
        return self._parse_scores(body, len(responses))

    def _parse_scores(self, body: Any, n: int) -> np.ndarray:
        if not isinstance(body, dict) or not isinstance(body.get("scores"), list):
            shown = sorted(body) if isinstance(body, dict) else type(body).__name__
            raise RemoteScorerError(f'{self.name}: expected a JSON object {{"scores": [...]}}, got {shown}')
        scores = body["scores"]
        if len(scores) != n:
            raise RemoteScorerError(f"{self.name}: sent {n} (prompt, response) items but got {len(scores)} scores")
        out = np.empty(n, dtype=np.float64)
        for i, v in enumerate(scores):
            if v is None:
                out[i] = math.nan
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[i] = float(v)
            else:
                raise RemoteScorerError(f"{self.name}: score {i} is {v!r}; scores must be numbers or null")
        return out

    def _post_batch(self, prompts: list[str], responses: list[str], where: str) -> np.ndarray:
        import time

        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._post_once(prompts, responses)
            except RemoteScorerError:
                self.stats["failed_batches"] += 1
                raise
            except _Transient as e:
                if attempt == attempts:
                    self.stats["failed_batches"] += 1
                    raise RemoteScorerError(
                        f"{self.name}: {where} failed after {attempts} attempt(s) ({self.retries} retries); "
                        f"last error: {e}"
                    ) from None
                delay = backoff_delay(attempt, base=self.backoff_s, cap=self.backoff_max_s)
                if e.retry_after is not None:
                    delay = min(self.backoff_max_s, max(delay, e.retry_after))
                self.stats["retries"] += 1
                log.warning("%s: %s: %s; retry %d/%d in %.2f s", self.name, where, e, attempt, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> ScoreResult:
        """One score per response, in order; batches of ``batch_size`` are sent one after the other."""
        prompts, responses = [str(p) for p in prompts], [str(r) for r in responses]
        _check_inputs(prompts, responses)
        n = len(responses)
        scores = np.empty(n, dtype=np.float64)
        n_batches = -(-n // self.batch_size)
        for b, start in enumerate(range(0, n, self.batch_size)):
            stop = min(n, start + self.batch_size)
            where = f"batch {b + 1}/{n_batches} (items {start}-{stop - 1})"
            scores[start:stop] = self._post_batch(prompts[start:stop], responses[start:stop], where)
        return ScoreResult(scores=scores, scale=self.scale)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        if self._session is not None:
            self._session.close()
            self._session = None
