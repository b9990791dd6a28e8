"""``serve``: the OpenAI-compatible server over the continuous-batching engine, asked over loopback
with the real ``openai`` client. Greedy answers are compared with ``Generator`` (what ``generate``
runs) on the same lifted model: tokens equal, also when requests of different lengths and settings
share the slots."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import urllib.error
import urllib.request

import pytest

from bridge.generate import Generator
from bridge.models import open_model
from bridge import serving
from bridge.serving import Busy, Engine, Request
from conftest import TINY_MAMBA, save

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Count to five.", "Who are you?",
             "Name three colours.", "What is 2+2?", "Tell me a joke about cats.", "Hello"]  # fmt: skip


class Served:
    """A server on a free loopback port in a thread: ``url``, ``stop()``."""

    def __init__(self, engine: Engine, name: str):
        from bridge import server

        got = threading.Event()
        self.engine, self.name = engine, name

        def ready(port, stop):
            self.url, self.stop = f"http://127.0.0.1:{port}", stop
            got.set()

        self.thread = threading.Thread(target=server.serve, args=(engine, name, "127.0.0.1", 0), daemon=True,
                                       kwargs=dict(log=None, ready=ready))  # fmt: skip
        self.thread.start()
        assert got.wait(120), "the server did not start"

    def post(self, path: str, body) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(devices):
    lifted = open_model("smollm2", devices=devices[:1], scheme="replicated")
    s = Served(Engine(lifted, slots=4, max_seq=256), "smollm2")
    yield s
    s.stop()
    s.thread.join(120)
    assert not s.thread.is_alive()


@pytest.fixture(scope="module")
def generator(served):
    return Generator(served.engine.lifted, after_request=())


def test_openai_client_chat_streamed_and_not_equals_generate(served, generator):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    question = QUESTIONS[0]
    want = generator.generate([question], 24, chat=True)
    answer = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                            max_tokens=24, temperature=0)  # fmt: skip
    assert answer.choices[0].message.content == want.texts[0]
    assert answer.usage.completion_tokens == len(want.token_ids[0])
    assert answer.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0, stream=True)]  # fmt: skip
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == want.texts[0]  # streamed piece by piece
    # a plain completion of token ids (no tokenizer needed) gives generate's tokens as its text
    ids = generator.encode("The capital of France is")
    want_ids = generator.generate_ids([ids], 8)
    done = client.completions.create(model="smollm2", prompt=ids, max_tokens=8, temperature=0)
    assert done.choices[0].text == want_ids.texts[0]


def test_eight_requests_together_share_the_slots(served, generator, monkeypatch):
    """8 requests at once on 4 slots (so some wait and join mid-flight), different prompt and
    answer lengths and settings, in rows that longer requests used before (whose columns must not
    be seen): the greedy ones equal generate's tokens; a sampled one is repeatable by its seed; a
    stop string ends an answer before it."""
    lengths = [12, 20, 8, 16, 24, 10, 30, 14]
    ids = [generator.encode(q, chat=True) for q in QUESTIONS]
    want = [generator.generate_ids([i], n).token_ids[0] for i, n in zip(ids, lengths)]
    sampled = dict(temperature=0.8, top_p=0.9, top_k=40, seed=7)
    engine = served.engine
    # Every row used before, for longer than a prompt.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(engine.complete, [Request(prompt_ids=[7, 8, 9], max_tokens=100, ignore_eos=True)
                                        for _ in range(4)]))  # fmt: skip
    # The cache moves (left once 8 columns before every live request are dead, right when a
    # prompt's bucket does not fit before the write column) many times while the 8 run.
    monkeypatch.setattr(serving, "SHIFT_AT", 8)
    shifts = engine.shifts
    requests = [Request(prompt_ids=i, max_tokens=n, temperature=0.0) for i, n in zip(ids, lengths)]
    requests[1] = Request(prompt_ids=ids[1], max_tokens=20, **sampled)
    requests[4] = Request(prompt_ids=ids[4], max_tokens=24, temperature=0.0, stop=["colour"])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(engine.complete, requests))
    for r, (text, tokens, finish) in enumerate(results):
        if r in (1, 4):
            continue
        assert tokens == want[r], (r, tokens, want[r])
        assert text == generator.decode(want[r]) and finish == ("stop" if tokens[-1] in engine.eos else "length")
    assert engine.shifts > shifts + 4
    assert [k[0] for k in engine.gen._compiled].count("serve/step") == 1  # mixed settings, one step program
    again = engine.complete(Request(prompt_ids=ids[1], max_tokens=20, **sampled))
    assert again == results[1]  # the same seed, the same answer, whatever shared the step
    text, tokens, finish = results[4]
    full = generator.decode(want[4][: len(tokens)])
    assert finish == "stop" and "colour" in full and text == full[: full.index("colour")]


def test_bad_requests_get_4xx_and_the_server_goes_on(served):
    cases = [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
        ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": [1, 2, 10**9]}, 400, "outside this model's vocabulary"),
        ({"prompt": [5] * 250, "max_tokens": 10}, 400, "exceeds this server's context"),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": "hi", "n": 2}, 400, "n=1"),
        ({"messages": "hi"}, 400, "messages"),
    ]
    for body, status, words in cases:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        got, error = served.post(path, body)
        assert got == status and words in error["error"]["message"] and error["error"]["type"], (body, got, error)
    got, answer = served.post("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert got == 200 and answer["usage"]["completion_tokens"] == 4


def test_a_full_queue_answers_429(served):
    """Requests beyond the slots wait in a bounded queue; one more is refused with 429 at once."""
    from bridge import server

    engine = Engine(served.engine.lifted, slots=1, max_seq=64, queue_size=1)  # never started: nothing is taken
    engine.submit(Request(prompt_ids=[1, 2, 3], max_tokens=2))
    with pytest.raises(Busy):
        engine.submit(Request(prompt_ids=[1, 2, 3], max_tokens=2))
    other = Served.__new__(Served)
    import uvicorn

    config = uvicorn.Config(server.build_app(engine, "m"), host="127.0.0.1", port=0, log_level="warning")
    s = uvicorn.Server(config)
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    while not s.started:
        t.join(0.05)
    other.url = f"http://127.0.0.1:{s.servers[0].sockets[0].getsockname()[1]}"
    got, error = other.post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2})
    s.should_exit = True
    t.join(30)
    assert got == 429 and error["error"]["type"] == "rate_limit_error"


def test_a_client_gone_frees_its_slot(served):
    """A streaming client that closes its connection after the first piece: its request ends at
    the next steps, long before its max_tokens, and the slot is free for the next request."""
    import http.client
    import time
    from urllib.parse import urlparse

    engine = served.engine
    u = urlparse(served.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": [7, 8, 9], "max_tokens": 240, "stream": True,
                                                        "ignore_eos": True, "temperature": 0}),
                 {"Content-Type": "application/json"})  # fmt: skip
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")  # the first piece
    steps = engine.steps
    conn.close()
    deadline = time.monotonic() + 120
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.active and engine.steps - steps < 200, engine.steps - steps
    got, answer = served.post("/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert got == 200 and answer["usage"]["completion_tokens"] == 3


def test_serve_command_drains_on_ctrl_c(tmp_path):
    """`torchax-bridge serve` in its own process: a streamed request in flight when SIGINT arrives
    still gets its whole answer, then the process exits 0 and the port is closed."""
    import os
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "bridge", "serve", "--devices", "1", "--scheme", "replicated",
                             "--max-seq", "128", "--port", "0", "--no-warmup"], stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
    try:
        url = None
        for line in proc.stderr:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                url = found.group(1)
                break
        assert url, "the server did not say where it listens"
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 40, "stream": True, "ignore_eos": True,
                           "temperature": 0}).encode()  # fmt: skip
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            first = r.readline()
            assert first.startswith(b"data: ")
            proc.send_signal(signal.SIGINT)
            rest = r.read().decode()
        chunks = [json.loads(x[6:]) for x in rest.split("\n") if x.startswith("data: {")]
        assert rest.rstrip().endswith("data: [DONE]") and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(120) == 0
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url + "/health", timeout=5)
    finally:
        proc.kill()


def test_a_recurrent_models_slots_keep_their_own_states(tmp_path, devices):
    """A Mamba behind the engine: its per-layer states live in the slots' rows (a joining request's
    row gets the state after its own prompt; a move of the cache's columns leaves states alone), so
    4 requests of different lengths, 2 slots (some join mid-flight, into rows used before), each
    equal generate's greedy tokens alone."""
    import transformers as T

    path = save(T.MambaConfig(**TINY_MAMBA), tmp_path / "mamba", std=0.3)
    lifted = open_model(path, devices=devices[:1], scheme="replicated", with_tokenizer=False)
    prompts = [[5, 9, 2, 7, 11, 3], [40, 41], [100, 7, 300, 12, 8, 9, 10, 77, 5, 1, 2], [3, 3, 4]]
    lengths = [10, 6, 8, 12]
    gen = Generator(lifted, stop_at_eos=False)
    want = [gen.generate_ids([p], n).token_ids[0] for p, n in zip(prompts, lengths)]
    assert len({t for w in want for t in w}) > 6  # tokens that vary
    engine = Engine(lifted, slots=2, max_seq=64).start()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(engine.complete, [Request(prompt_ids=p, max_tokens=n, temperature=0.0, ignore_eos=True)
                                                      for p, n in zip(prompts, lengths)]))  # fmt: skip
    finally:
        engine.stop()
    assert [tokens for _, tokens, _ in results] == want
