"""The HTTP reward scorer against a real HTTP server on 127.0.0.1 (started here, loopback only).

The server answers each request by the next behaviour in its script ("ok" once the script is used up), so every
test sends a bounded number of requests: at most 1 + retries per batch.
"""

from __future__ import annotations

import json
import math
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from omni_ray.config import ConfigError, ScorerSpec, load_config, to_yaml
from omni_ray.scoring import HttpScorer, RemoteScorerError, ScoringService, build_scorer
from omni_ray.scoring.remote import backoff_delay, redact_url

TOKEN_ENV = "OMNI_RAY_TEST_RM_TOKEN"
SECRET = "s3cret-token-value-123"


class FakeRewardServer:
    """A reward endpoint on 127.0.0.1: scores = len(response); misbehaves as scripted; records every request."""

    def __init__(self) -> None:
        self.script: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                with owner.lock:
                    owner.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    action = owner.script.pop(0) if owner.script else "ok"
                owner.respond(self, action, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/score"

    def reset(self, *script: str) -> None:
        with self.lock:
            self.script = list(script)
            self.requests = []

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict[str, str] | None = None):
        try:
            handler.send_response(status)
            for k, v in (headers or {}).items():
                handler.send_header(k, v)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass

    def respond(self, handler: BaseHTTPRequestHandler, action: str, body: Any) -> None:
        responses = body.get("responses", []) if isinstance(body, dict) else []
        scores: list[Any] = [float(len(r)) for r in responses]
        if action == "ok":
            self._send(handler, 200, json.dumps({"scores": scores}).encode())
        elif action == "row":  # score = the item's "level" column, correct = response == reference
            answer = {
                "scores": [float(x) for x in body["level"]],
                "correct": [r == ref for r, ref in zip(responses, body["references"])],
            }
            self._send(handler, 200, json.dumps(answer).encode())
        elif action == "flags_short":
            self._send(handler, 200, json.dumps({"scores": scores, "correct": [True] * (len(scores) - 1)}).encode())
        elif action == "flags_null":
            self._send(handler, 200, json.dumps({"scores": scores, "correct": [None] * len(scores)}).encode())
        elif action.startswith("retry_after:"):  # 503 with a Retry-After header
            self._send(handler, 503, b"busy", {"Retry-After": action.split(":", 1)[1]})
        elif action == "null_first":
            self._send(handler, 200, json.dumps({"scores": [None, *scores[1:]]}).encode())
        elif action == "short":
            self._send(handler, 200, json.dumps({"scores": scores[:-1]}).encode())
        elif action == "not_json":
            self._send(handler, 200, b"<html>oops</html>")
        elif action == "string_score":
            self._send(handler, 200, json.dumps({"scores": ["high"] * len(scores)}).encode())
        elif action == "slow":
            time.sleep(1.0)
            self._send(handler, 200, json.dumps({"scores": scores}).encode())
        elif action.startswith("redirect:"):
            self._send(handler, 307, b"", {"Location": action.split(":", 1)[1]})
        else:  # an HTTP status code
            self._send(handler, int(action), f"server says {action}".encode())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeRewardServer]:
    s = FakeRewardServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def other_server() -> Iterator[FakeRewardServer]:
    s = FakeRewardServer()
    yield s
    s.close()


def scorer_for(server: FakeRewardServer, **kw: Any) -> HttpScorer:
    kw = {"scale": (0.0, 10.0), "backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, **kw}
    return HttpScorer(server.url, **kw)


PROMPTS = [f"{i}+{i}=" for i in range(7)]
RESPONSES = ["1" * (i % 4 + 1) for i in range(7)]
EXPECTED = [float(len(r)) for r in RESPONSES]


# ---------------------------------------------------------------------------------------------------------------------
# protocol and batching


def test_scores_come_back_aligned_across_batches_with_the_documented_json_body(server):
    server.reset()
    res = scorer_for(server, batch_size=3).score(PROMPTS, RESPONSES)
    np.testing.assert_array_equal(res.scores, EXPECTED)
    assert res.scale == (0.0, 10.0)
    bodies = [r["body"] for r in server.requests]
    assert [len(b["responses"]) for b in bodies] == [3, 3, 1]
    assert sum((b["prompts"] for b in bodies), []) == PROMPTS
    assert all(set(b) == {"prompts", "responses"} for b in bodies)
    assert server.requests[0]["path"] == "/score"
    assert server.requests[0]["headers"]["Content-Type"] == "application/json"
    assert "Authorization" not in server.requests[0]["headers"]


def test_http_spec_through_build_scorer_and_service_counts_null_scores_as_nonfinite(server):
    server.reset("null_first")
    spec = ScorerSpec(type="http", url=server.url, batch_size=4, scale_low=0, scale_high=5)
    scorer = build_scorer([spec])
    assert isinstance(scorer, HttpScorer) and scorer.batch_size == 4 and scorer.scale == (0.0, 5.0)
    res = ScoringService(scorer, rescale="declared", rescale_low=0, rescale_high=10).score(PROMPTS, RESPONSES)
    assert math.isnan(res.raw_scores[0]) and res.nonfinite == 1
    np.testing.assert_array_equal(res.raw_scores[1:], EXPECTED[1:])
    np.testing.assert_allclose(res.scores[1:], np.asarray(EXPECTED[1:]) * 2)
    assert len(server.requests) == 2


def test_empty_input_sends_no_request(server):
    server.reset()
    assert len(scorer_for(server).score([], [])) == 0
    assert server.requests == []


# ---------------------------------------------------------------------------------------------------------------------
# retries, backoff, clear errors


def test_transient_failures_are_retried_until_success(server):
    server.reset("500", "429", "503")
    scorer = scorer_for(server, retries=3)
    np.testing.assert_array_equal(scorer.score(PROMPTS, RESPONSES).scores, EXPECTED)
    assert len(server.requests) == 4
    assert scorer.stats == {"requests": 4, "retries": 3, "failed_batches": 0}


def test_last_retry_failure_raises_naming_endpoint_batch_attempts_and_last_error(server):
    server.reset("502", "503", "500")
    scorer = scorer_for(server, retries=2, batch_size=4)
    with pytest.raises(RemoteScorerError) as err:
        scorer.score(PROMPTS, RESPONSES)
    msg = str(err.value)
    assert server.url in msg and "batch 1/2" in msg and "3 attempt(s)" in msg
    assert "HTTP 500" in msg and "server says 500" in msg
    assert len(server.requests) == 3  # the second batch is never sent
    assert scorer.stats["failed_batches"] == 1


def test_timeouts_are_retried_then_reported(server):
    server.reset("slow", "slow")
    with pytest.raises(RemoteScorerError, match=r"2 attempt\(s\).*timed out after 0.2 s"):
        scorer_for(server, retries=1, timeout_s=0.2).score(PROMPTS[:2], RESPONSES[:2])
    assert len(server.requests) == 2


def test_refused_connection_is_retried_then_reported():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scorer = HttpScorer(f"http://127.0.0.1:{port}/score", scale=(0, 1), retries=1, backoff_s=0.01)
    with pytest.raises(RemoteScorerError, match=r"2 attempt\(s\).*connection failed"):
        scorer.score(["1+1="], ["2"])
    assert scorer.stats["requests"] == 2


@pytest.mark.parametrize("status", ["400", "404", "422"])
def test_client_errors_are_permanent_and_not_retried(server, status):
    server.reset(status)
    with pytest.raises(RemoteScorerError, match=f"permanent error HTTP {status}"):
        scorer_for(server, retries=3).score(PROMPTS, RESPONSES)
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("action", "message"),
    [
        ("short", r"sent 7 \(prompt, response\) items but got 6 scores"),
        ("not_json", "not JSON"),
        ("string_score", "must be numbers or null"),
    ],
)
def test_malformed_answers_are_clear_errors_without_retry(server, action, message):
    server.reset(action)
    with pytest.raises(RemoteScorerError, match=message):
        scorer_for(server, retries=3).score(PROMPTS, RESPONSES)
    assert len(server.requests) == 1


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The delays the client asks time.sleep for, recorded instead of slept (no test waits on a backoff)."""
    asked: list[float] = []
    monkeypatch.setattr(time, "sleep", asked.append)
    return asked


def test_retries_back_off_doubling_from_the_first_retry_up_to_the_cap(server, sleeps):
    server.reset("500", "502", "503", "429")
    scorer = scorer_for(server, retries=4, backoff_s=0.01, backoff_max_s=0.05)
    np.testing.assert_array_equal(scorer.score(PROMPTS, RESPONSES).scores, EXPECTED)
    np.testing.assert_allclose(sleeps, [0.01, 0.02, 0.04, 0.05])  # 0.01 * 2**k, capped at 0.05


def test_retry_after_replaces_the_backoff_capped_at_backoff_max(server, sleeps):
    server.reset("retry_after:0", "retry_after:1", "retry_after:100")
    scorer = scorer_for(server, retries=3, backoff_s=0.01, backoff_max_s=2.0)
    np.testing.assert_array_equal(scorer.score(PROMPTS, RESPONSES).scores, EXPECTED)
    # "0" leaves the backoff (0.01), "1" is honoured, "100" is capped at backoff_max_s.
    np.testing.assert_allclose(sleeps, [0.01, 1.0, 2.0])
    assert scorer.stats == {"requests": 4, "retries": 3, "failed_batches": 0}


def test_request_timeout_status_408_is_retried_and_413_is_permanent(server, sleeps):
    server.reset("408")
    np.testing.assert_array_equal(scorer_for(server, retries=1).score(PROMPTS, RESPONSES).scores, EXPECTED)
    assert len(server.requests) == 2
    server.reset("413")
    with pytest.raises(RemoteScorerError, match="permanent error HTTP 413"):
        scorer_for(server, retries=3).score(PROMPTS, RESPONSES)
    assert len(server.requests) == 1


def test_backoff_doubles_per_retry_and_is_capped():
    assert [backoff_delay(r, base=0.5, cap=3.0) for r in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ValueError):
        backoff_delay(0, base=1.0, cap=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# the prompt's row: references and extra columns go out, correct flags come back

ROW_REFERENCES = ["1", "x", "111", "y", "1", "11", "z"]  # items 0, 2, 4, 5 equal their response
LEVELS = [5, 2, 8, 1, 9, 3, 7]  # distinct per item: a shuffle would show


def test_references_and_columns_are_sent_per_batch_in_item_order_and_flags_come_back(server):
    server.reset("row", "row", "row")
    topics = [f"topic {i}" for i in range(7)]
    svc = ScoringService(scorer_for(server, batch_size=3), "none")
    res = svc.score(PROMPTS, RESPONSES, ROW_REFERENCES, {"level": LEVELS, "topic": topics})
    assert res.raw_scores.tolist() == [5.0, 2.0, 8.0, 1.0, 9.0, 3.0, 7.0]
    assert res.correct.tolist() == [True, False, True, False, True, True, False]
    bodies = [r["body"] for r in server.requests]
    assert [set(b) for b in bodies] == [{"prompts", "responses", "references", "level", "topic"}] * 3
    for key, sent in (("prompts", PROMPTS), ("references", ROW_REFERENCES), ("level", LEVELS), ("topic", topics)):
        assert sum((b[key] for b in bodies), []) == sent


def test_references_are_left_out_when_no_item_has_one_and_sent_as_null_where_missing(server):
    server.reset()
    scorer_for(server).score(PROMPTS, RESPONSES, [None] * 7)
    assert set(server.requests[0]["body"]) == {"prompts", "responses"}
    server.reset()
    scorer_for(server).score(PROMPTS[:2], RESPONSES[:2], ["1", None])
    assert server.requests[0]["body"]["references"] == ["1", None]


@pytest.mark.parametrize(
    ("action", "message"),
    [("flags_short", "a list of 7 true/false values, got 6"), ("flags_null", r'"correct"\[0\] is None')],
)
def test_malformed_correct_flags_are_clear_errors(server, action, message):
    server.reset(action)
    with pytest.raises(RemoteScorerError, match=message):
        scorer_for(server).score(PROMPTS, RESPONSES)


def test_a_column_that_is_not_json_is_an_error_naming_it(server):
    server.reset()
    with pytest.raises(ValueError, match="column 'when' cannot be sent as JSON"):
        scorer_for(server).score(PROMPTS[:1], RESPONSES[:1], when=[object()])
    assert server.requests == []


# ---------------------------------------------------------------------------------------------------------------------
# safety: only the configured URL, secrets from the environment only


def test_redirect_to_another_host_is_refused_and_never_followed(server, other_server):
    server.reset(f"redirect:{other_server.url.replace('127.0.0.1', 'localhost')}?k=v")
    other_server.reset()
    with pytest.raises(RemoteScorerError, match=r"307 redirecting to http://localhost:\d+/score; redirects are not"):
        scorer_for(server, retries=3).score(PROMPTS, RESPONSES)
    assert len(server.requests) == 1
    assert other_server.requests == []


def test_token_is_read_from_the_named_env_var_and_never_in_config_repr_errors_or_pickles(
    server, monkeypatch, yaml_file
):
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    cfg = load_config(
        yaml_file(f"scoring:\n  scorers:\n    - type: http\n      url: {server.url}\n      token_env: {TOKEN_ENV}\n")
    )
    scorer = build_scorer(list(cfg.scoring.scorers))
    server.reset("401")
    with pytest.raises(RemoteScorerError) as err:
        scorer.score(PROMPTS, RESPONSES)
    assert f"${TOKEN_ENV}" in str(err.value)
    server.reset()
    scorer.score(PROMPTS, RESPONSES)
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    blob = pickle.dumps(scorer)
    for text in (to_yaml(cfg), repr(scorer), scorer.name, str(err.value), repr(ScoringService(scorer).scorer)):
        assert SECRET not in text
    assert SECRET.encode() not in blob
    server.reset()
    pickle.loads(blob).score(PROMPTS[:1], RESPONSES[:1])  # re-read from this process' environment
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"


def test_unset_token_env_raises_naming_the_variable(server, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match=f"'{TOKEN_ENV}', which is unset or empty"):
        HttpScorer(server.url, scale=(0, 1), token_env=TOKEN_ENV)


def test_query_string_is_redacted_from_names():
    assert redact_url("https://rm.example:8443/v1/score?api_key=abc#x") == "https://rm.example:8443/v1/score"
    assert "abc" not in HttpScorer("https://rm.example/score?api_key=abc", scale=(0, 1)).name


# ---------------------------------------------------------------------------------------------------------------------
# config


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        return p

    return write


def test_config_refuses_http_scorer_without_usable_url_or_with_a_pasted_token(yaml_file):
    base = "scoring:\n  scorers:\n    - type: http\n"
    with pytest.raises(ConfigError, match=r"scorers\[0\]\.url"):
        load_config(yaml_file(base))
    with pytest.raises(ConfigError, match=r"scorers\[0\]\.url"):
        load_config(yaml_file(base + "      url: ftp://host/x\n"))
    with pytest.raises(ConfigError, match="must not carry credentials"):
        load_config(yaml_file(base + "      url: https://me:pw@host/x\n"))
    with pytest.raises(ConfigError, match="NAME of an environment variable") as err:
        load_config(yaml_file(base + "      url: https://host/x\n      token_env: sk-live-abc123\n"))
    assert "sk-live-abc123" not in str(err.value)
    with pytest.raises(ConfigError, match=r"scorers\[0\]\.retries"):
        load_config(yaml_file(base + "      url: https://host/x\n      retries: -1\n"))
    cfg = load_config(yaml_file(base + "      url: https://host/x\n      retries: 5\n      timeout_s: 2\n"))
    assert cfg.scoring.scorers[0].retries == 5 and cfg.scoring.scorers[0].timeout_s == 2.0
