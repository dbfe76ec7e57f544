"""The reward server over real HTTP on loopback, with the scripted judge of
test_judge.py: results, limits, path safety, and a burst of concurrent clients."""
import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from test_judge import ScriptedJudge, scripted_p1

from r1reward import serve as S


class SlowScriptedJudge(ScriptedJudge):
    """Takes a little time per batch, as a model does, so concurrent requests queue up."""

    def _generate_texts(self, reqs, n, do_sample, should_stop=None):
        time.sleep(0.02)
        return super()._generate_texts(reqs, n, do_sample)


def _debiased(r1, r2):
    """What the judge must return: p1 of the original order averaged with 1 - p1 of the
    swapped order."""
    return (scripted_p1(r1, r2) + 1 - scripted_p1(r2, r1)) / 2


def _png_b64(size=(16, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "ok.png")
    Image.new("RGB", (300, 300)).save(root / "huge.png")
    (tmp_path / "secret.png").write_bytes((root / "ok.png").read_bytes())
    judge = SlowScriptedJudge(baseline="q=0")
    limits = S.Limits(max_body_bytes=200_000, max_image_pixels=200 * 200, max_items=4, max_k=5)
    srv = S.make_server(judge, "127.0.0.1", 0, str(root), max_batch=8, limits=limits)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    host, port = srv.server_address[:2]
    yield f"http://{host}:{port}", srv, judge
    srv.shutdown()
    srv.batcher.close()
    srv.server_close()


def _call(url, path, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    rq = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET",
                                headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(rq, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_judge_and_get_reward(server):
    url, srv, _ = server
    assert _call(url, "/health") == (200, {"status": "ok", "model": "", "max_batch": 8, "queued": 0,
                                           "connections": 1})
    assert srv.server_address[0] == "127.0.0.1"
    st, out = _call(url, "/judge", {"image": _png_b64(), "question": "q", "response_1": "q=0",
                                    "response_2": "q=2", "k": 3})
    assert st == 200 and out["verdict"] == 2 and out["votes"] == [2] * 4  # early stop: 2 per order
    assert out["score"] == pytest.approx(_debiased("q=0", "q=2"))
    st, out = _call(url, "/judge", {"image": "ok.png", "question": "q", "response_1": "q=1",
                                    "response_2": "q=0"})
    assert st == 200 and out["verdict"] == 1
    # OpenRLHF protocol: response = query minus its prompt; label = the reference answer
    st, out = _call(url, "/get_reward", {"query": ["P: q=2", "P: q=0"], "prompts": ["P:", "P:"],
                                         "labels": ["q=1", "q=1"]})
    assert st == 200 and len(out["rewards"]) == 2
    assert out["rewards"][0] == pytest.approx(_debiased("q=2", "q=1"))
    assert out["rewards"][1] < 0.5 < out["rewards"][0]
    st, out = _call(url, "/get_reward", {"query": ["q=1"], "images": ["data:image/png;base64," + _png_b64()]})
    assert st == 200 and out["rewards"][0] == pytest.approx(_debiased("q=1", "q=0"))


@pytest.mark.parametrize("body,status,needle", [
    ({"question": "q", "response_1": "a"}, 400, "'response_2'"),
    ({"question": "q", "response_1": "a", "response_2": 3}, 400, "'response_2' must be str"),
    ({"question": "q", "response_1": "a", "response_2": "b", "k": 99}, 400, "'k' must be between"),
    ({"question": "q", "response_1": "a", "response_2": "b", "image": "../secret.png"}, 403, "escapes"),
    ({"question": "q", "response_1": "a", "response_2": "b", "image": "/etc/passwd"}, 403, "escapes"),
    ({"question": "q", "response_1": "a", "response_2": "b", "image": "nope.png"}, 400, "not found"),
    ({"question": "q", "response_1": "a", "response_2": "b", "image": "huge.png"}, 413, "pixels"),
    ({"question": "q", "response_1": "a", "response_2": "b", "image": "QUJDREVGR0hJSktMTU5PUA=="},
     400, "not a readable"),
])
def test_judge_errors_are_json_4xx(server, body, status, needle):
    st, out = _call(server[0], "/judge", body)
    assert st == status and needle in out["error"]


def test_limits_on_body_batch_and_routes(server):
    url = server[0]
    st, out = _call(url, "/judge", raw=b"x" * 300_000)
    assert st == 413 and "over the limit" in out["error"]
    st, out = _call(url, "/get_reward", {"query": ["a"] * 5})
    assert st == 413 and "5 queries" in out["error"]
    st, out = _call(url, "/get_reward", {"query": ["a", "b"], "prompts": ["a"]})
    assert st == 400 and "'prompts' has 1" in out["error"]
    assert _call(url, "/judge", raw=b"{not json")[0] == 400
    assert _call(url, "/nope", {"a": 1})[0] == 404


def test_burst_of_concurrent_clients_is_batched(server):
    url, srv, judge = server
    assert srv.request_queue_size >= 32  # all 32 clients fit the listen backlog (no resets)

    def client(i):
        q1, q2 = i % 5, (i * 3) % 5
        st, out = _call(url, "/judge", {"image": _png_b64(), "question": "q",
                                        "response_1": f"q={q1}", "response_2": f"q={q2}"})
        return st, out, _debiased(f"q={q1}", f"q={q2}")

    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(client, range(64)))
    assert all(st == 200 for st, _, _ in results)
    for _, out, want in results:
        assert out["score"] == pytest.approx(want, abs=1e-9)
    assert sum(size * n for size, n in srv.batcher.batch_sizes.items()) == 64
    assert max(srv.batcher.batch_sizes) > 1  # concurrent requests shared model calls
    assert max(judge.batches) <= 2 * 8       # a batch is at most max_batch pairs x 2 orders


def test_tiny_model_served_over_http(tiny_dir, tmp_path):
    """The embedded tiny model behind the server gives the library's own judgment."""
    from r1reward.judge import RewardJudge
    judge = RewardJudge.from_pretrained(tiny_dir, max_new_tokens=8)
    Image.new("RGB", (112, 112), (220, 30, 30)).save(tmp_path / "red.png")
    srv = S.make_server(judge, "127.0.0.1", 0, str(tmp_path), limits=S.Limits(max_pair_tokens=300))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = "http://{}:{}".format(*srv.server_address[:2])
    try:
        body = {"question": "What colour is the shape?", "response_1": "Red.", "response_2": "Blue."}
        # a lone surrogate crashes the real tokenizer (TypeError): it used to fail every
        # request batched with it; now it is a 400 before the model
        bad = dict(body, image="red.png", question="What colour\ud800?")
        images = ["red.png", _png_b64((112, 112)), "red.png"]
        with ThreadPoolExecutor(4) as ex:
            answers = list(ex.map(lambda b: _call(url, "/judge", b),
                                  [dict(body, image=im) for im in images] + [bad]))
        assert answers[3][0] == 400 and "UTF-8" in answers[3][1]["error"]
        answers = answers[:3]
        assert all(st == 200 for st, _ in answers)
        # the token limit, counted by the model's own tokenizer before the model runs
        st, out = _call(url, "/judge", dict(body, question="What colour is the shape? " * 60))
        assert st == 413 and "tokens of text, over the limit of 300" in out["error"]
        want = judge.judge(tmp_path / "red.png", body["question"], "Red.", "Blue.")
        for _, out in (answers[0], answers[2]):
            assert out["verdict"] == want.verdict and out["votes"] == want.votes
            assert out["score"] == pytest.approx(want.score, abs=1e-4)
        st, out = _call(url, "/get_reward", {"query": ["Q Red."], "prompts": ["Q"], "images": ["red.png"]})
        assert st == 200 and 0.0 <= out["rewards"][0] <= 1.0
    finally:
        srv.shutdown()
        srv.batcher.close()
        srv.server_close()
