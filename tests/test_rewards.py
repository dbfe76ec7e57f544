"""Rewards (SPEC §2) and the consistency judges (rule, local model, HTTP endpoint)."""
import asyncio
import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from r1reward.rewards import (
    JudgeSample,
    LocalJudge,
    OpenAIJudge,
    RuleJudge,
    analysis_tail,
    compute_rewards,
    format_reward,
    parse_answer,
    parse_verdict,
    result_reward,
    sentence_vote,
)

GOOD = "<think>Response 2 names the right colour.</think><answer>2</answer>"


@pytest.mark.parametrize("text,expected", [
    (GOOD, 1.0),
    (GOOD + "<|im_end|>", 1.0),                       # end-of-turn token is stripped
    ("  \n" + GOOD + " <|im_end|>\n<|endoftext|> ", 1.0),  # and whitespace around, repeatedly
    ("<think>line one\nline two</think><answer>1</answer>", 1.0),  # DOTALL
    ("<think>a</think>\n<answer>2</answer>", 0.0),    # SPEC regex: nothing between the blocks
    ("<answer>2</answer>", 0.0),                      # no analysis
    ("<think>a</think><answer>2</answer> extra", 0.0),  # text after the answer
    ("<think>a<think>b</think><answer>2</answer>", 0.0),  # two <think>
    ("<think>a</think>b</think><answer>2</answer>", 0.0),  # stray </think> the lazy regex accepts
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),  # two answers
    ("<think>a</think><answer>2", 0.0),               # truncated
    ("", 0.0),
])
def test_format_reward(text, expected):
    assert format_reward(text) == expected


@pytest.mark.parametrize("text,expected", [
    (GOOD, 2),
    ("<answer> 1 </answer>", 1),
    ("<answer>Response 2</answer>", 2),
    ("<think>maybe <answer>1</answer>?</think><answer>2</answer>", 2),  # the last block counts
    ("<answer>1/2</answer>", None),        # copying the template's "1/2" is not an answer
    ("<answer>1 or 2</answer>", None),
    ("<answer></answer>", None),
    ("<answer>two</answer>", None),
    ("<think>x</think><answer>2", None),   # unclosed: truncated generation
    ("Response 2 is better.", None),
    ("<answer>-1</answer>", -1),
    ("<answer>12</answer>", 12),
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_result_reward_and_bad_label():
    assert result_reward(GOOD, 2) == 1.0
    assert result_reward(GOOD, 1) == 0.0
    assert result_reward("<answer>12</answer>", 2) == 0.0
    assert result_reward("no answer at all", 1) == 0.0   # the release would give 1.0 here
    assert result_reward(GOOD, torch.tensor(2)) == 1.0
    with pytest.raises(ValueError, match="preferred must be 1 or 2"):
        result_reward(GOOD, 3)


class ScriptedJudge:
    """Returns scripted verdicts and records what it was asked."""

    def __init__(self, verdicts):
        self.verdicts, self.seen = list(verdicts), []

    def judge(self, samples):
        self.seen.extend(samples)
        return self.verdicts[:len(samples)]


def _resp(answer, fmt=True):
    body = f"<think>analysis</think><answer>{answer}</answer>"
    return body if fmt else "Sure! " + body


def test_compute_rewards_hand_worked_release_weights():
    texts = [_resp(2), _resp(2), _resp(1), _resp(2, fmt=False), _resp("1/2")]
    judge = ScriptedJudge([+1, -1, None])          # asked only for rollouts 0, 1, 3
    rb = compute_rewards(texts, [2, 2, 2, 2, 2], judge, w_format=0.5, w_consistency=0.5)
    # 0: format 1, right, consistent:      0.5*1 + 1*(1 + 0.5*1)  = 2.0
    # 1: format 1, right, contradicts:     0.5*1 + 1*(1 + 0.5*-1) = 1.0
    # 2: format 1, wrong (judge not asked): 0.5*1 + 0              = 0.5
    # 3: format 0, right, judge failed:    0     + 1*(1 + 0.5*0)  = 1.0
    # 4: format 1, unparsable "1/2":       0.5*1 + 0              = 0.5
    assert rb.total.tolist() == [2.0, 1.0, 0.5, 1.0, 0.5]
    assert rb.format.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert rb.result.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert rb.consistency.tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]
    assert rb.answers == [2, 2, 1, 2, None]
    assert (rb.judge_failures, rb.parse_failures, rb.judged) == (1, 1, 3)
    assert [s.response for s in judge.seen] == [texts[0], texts[1], texts[3]]
    m = rb.metrics()
    assert m["reward/total"] == pytest.approx(5.0 / 5) and m["reward/accuracy"] == pytest.approx(0.6)


def test_compute_rewards_paper_weights_and_no_judge():
    # paper form: format + result*(1 + 0.5*consistency) = 1 + 1*(1 + 0.5) = 2.5
    rb = compute_rewards([_resp(1)], [1], ScriptedJudge([1]), w_format=1.0, w_consistency=0.5)
    assert rb.total.tolist() == [2.5]
    rb = compute_rewards([_resp(1), _resp(2)], torch.tensor([1, 1]), None)
    # no judge: 0.5 + 1 = 1.5 and 0.5 + 0 = 0.5
    assert rb.total.tolist() == [1.5, 0.5] and rb.judged == 0 and rb.judge_failures == 0


def test_compute_rewards_judge_all_asks_wrong_answers_too():
    judge = ScriptedJudge([1, -1])
    rb = compute_rewards([_resp(1), _resp(2)], [1, 1], judge, judge_all=True)
    assert len(judge.seen) == 2
    # the wrong rollout's consistency is recorded but multiplied by result 0
    assert rb.consistency.tolist() == [1.0, -1.0] and rb.total.tolist() == [2.0, 0.5]


class RaisingJudge:
    def judge(self, samples):
        raise RuntimeError("judge server down")


@pytest.mark.parametrize("judge", [RaisingJudge(), ScriptedJudge([1]), ScriptedJudge([5, True])])
def test_broken_judges_never_grant_reward(judge):
    # raising, too few verdicts, out-of-range values: all consistency 0 and counted
    rb = compute_rewards([_resp(2), _resp(2)], [2, 2], judge)
    assert rb.consistency.tolist() == [0.0, 0.0]
    assert rb.total.tolist() == [1.5, 1.5] and rb.judge_failures == 2


def test_compute_rewards_bad_input_names_the_field():
    with pytest.raises(ValueError, match=r"preferred\[1\]"):
        compute_rewards([GOOD, GOOD], [2, 0])
    with pytest.raises(ValueError, match="2 texts but 1 preferred"):
        compute_rewards([GOOD, GOOD], [2])
    with pytest.raises(ValueError, match="images"):
        compute_rewards([GOOD], [2], images=[None, None])


@pytest.mark.parametrize("sentence,side", [
    ("Therefore, Response 2 is better.", 2),
    ("Response 1 is less accurate than Response 2.", 2),
    ("Response 1 is not as accurate as Response 2.", 2),
    ("Overall, I prefer the first response.", 1),
    ("The better response is Response 1.", 1),
    ("Thus the final answer is 2.", 2),
    ("Response 1 is correct about the colour, but Response 2 is better overall.", 2),
    ("Response 2 incorrectly counts the birds, so Response 1 wins.", 1),
    ("Response 2, however, is better.", 2),       # contrast word inside the clause
    ("Response 1 is still the stronger answer.", 1),
    ("Response 1 chose option 2, which is correct.", 1),  # "option 2" is not a response
    ("Both responses describe the image.", 0),
    ("Response 1 is accurate and Response 2 is accurate too.", 0),  # argues both ways
])
def test_sentence_vote(sentence, side):
    assert sentence_vote(sentence) == side


def test_rule_judge_reads_the_tail_backwards():
    text = ("<think>Response 1 is better at first sight. It lists three objects. "
            "However, Response 2 is more accurate about the count. The image has two cats."
            "</think><answer>{}</answer>")
    j = RuleJudge(tail_sentences=3)
    samples = [JudgeSample(text.format(2), 2), JudgeSample(text.format(1), 1),
               JudgeSample("<think>It is a cat.</think><answer>1</answer>", 1),
               JudgeSample(text.format("x"), None)]
    # last sentence is neutral, the one before argues for 2 → +1 for answer 2, -1 for 1;
    # "better at first sight" is outside the 3-sentence tail; no argument → 0; no answer → 0
    assert j.judge(samples) == [1, -1, 0, 0]
    assert RuleJudge(tail_sentences=1).judge(samples[:1]) == [0]
    assert "two cats" in analysis_tail(text.format(2), 1)


@pytest.mark.parametrize("reply,verdict", [
    ("yes", 1), ("Yes.", 1), ("**No**", -1), ("no, it argues for the other", -1),
    ("Consistent", 1), ("<think>hmm yes or no</think>No", -1), ("The answer is yes.", 1),
    ("maybe", None), ("", None), (None, None), ("yes and no", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


class FakeGenerator:
    def __init__(self, replies):
        self.replies, self.prompts = replies, []

    def generate_texts(self, prompts):
        self.prompts.extend(prompts)
        if isinstance(self.replies, Exception):
            raise self.replies
        out, self.replies = self.replies[:len(prompts)], self.replies[len(prompts):]
        return out


def test_local_judge_with_fake_generator():
    samples = [JudgeSample(_resp(1), 1), JudgeSample(_resp(2), 2), JudgeSample("x", None),
               JudgeSample(_resp(1), 1)]
    gen = FakeGenerator(["Yes.", "no", "not sure"])
    assert LocalJudge(gen, batch_size=2).judge(samples) == [1, -1, 0, None]
    assert len(gen.prompts) == 3 and "Final choice: Response 2" in gen.prompts[1]
    # failing or short generators: every asked sample is a failure (None), never a reward
    assert LocalJudge(FakeGenerator(RuntimeError("oom"))).judge(samples) == [None, None, 0, None]
    assert LocalJudge(FakeGenerator(["yes"])).judge(samples[:2]) == [None, None]
    with pytest.raises(ValueError, match="processor"):
        LocalJudge(object())



def _tiny_lm_always_saying(word):
    """A 1-layer Qwen2 LM whose greedy output is always token 0 (= ``word``): zeroing the
    final norm makes every logit 0 and argmax picks the first id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = [word, "no" if word == "yes" else "yes", "<pad>", "<eos>", "[UNK]", "response"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                     unk_token="[UNK]")
    hf_tok.chat_template = "{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}"
    cfg = Qwen2Config(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      pad_token_id=2, eos_token_id=3)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model, hf_tok


@pytest.mark.parametrize("word,verdict", [("yes", 1), ("no", -1)])
def test_local_judge_with_a_real_hf_model(word, verdict):
    model, tok = _tiny_lm_always_saying(word)
    tok.padding_side = "right"
    samples = [JudgeSample(_resp(2), 2), JudgeSample("<think>short</think><answer>1</answer>", 1)]
    assert LocalJudge(model, tok, max_new_tokens=2).judge(samples) == [verdict, verdict]
    assert tok.padding_side == "right"  # the caller's tokenizer is left as it was

# ---------------------------------------------------------------------------------------
# OpenAIJudge against a real HTTP server on loopback. The analysis names a scripted case;
# the server answers per case and per attempt, and records every request.

SCRIPTS = {  # case -> what the server does on attempt 1, 2, 3, ...
    "yes": ["yes"], "no": ["No."],
    "flaky": [500, 503, "yes"],          # two server errors, then a verdict
    "down": [500, 500, 500, "yes"],      # would succeed on a 4th try, which never comes
    "slow": ["sleep", "sleep", "sleep"],  # every try times out
    "slowonce": ["sleep", "no"],
    "gibberish": ["perhaps", "it depends", "unclear", "yes"],
    "badjson": ["!json", "yes"],
    "auth": [401, "yes"],                # not retryable
    "busy": ["wait", "wait", "wait", "wait", "wait", "wait"],
}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"][-1]["text"]
        case = re.search(r"CASE-(\w+)", text).group(1)
        with srv.lock:
            srv.requests.append((self.path, dict(self.headers), body, case))
            attempt = sum(1 for r in srv.requests if r[3] == case) - 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            action = SCRIPTS[case][min(attempt, len(SCRIPTS[case]) - 1)]
            if action == "sleep":
                srv.release.wait(10.0)  # outlive the client's timeout; freed at teardown
                return
            if action == "wait":
                time.sleep(0.1)
                action = "yes"
            if isinstance(action, int):
                self.send_response(action)
                self.end_headers()
                self.wfile.write(b"error")
                return
            payload = b"not json" if action == "!json" else json.dumps(
                {"choices": [{"message": {"role": "assistant", "content": action}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)
        finally:
            with srv.lock:
                srv.in_flight -= 1


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops bursts of concurrent connects
    daemon_threads = True


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.lock, srv.requests, srv.in_flight, srv.max_in_flight = threading.Lock(), [], 0, 0
    srv.release = threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def _case(name, answer=2, image=None):
    return JudgeSample(f"<think>Response 1 is weak. CASE-{name} ends here.</think>"
                       f"<answer>{answer}</answer>", answer, image)


def _judge(server, **kw):
    # generous for a loaded 2-core CI box; the "slow" case costs 3 timeouts
    kw.setdefault("timeout", 1.0)
    return OpenAIJudge(f"http://127.0.0.1:{server.server_address[1]}/v1", "judge-model",
                       backoff=0.0, **kw)


def test_openai_judge_scripted_server(server):
    cases = ["yes", "no", "flaky", "down", "slow", "slowonce", "gibberish", "badjson", "auth"]
    samples = [_case(c) for c in cases] + [JudgeSample("<think>CASE-yes</think>", None)]
    verdicts = _judge(server, api_key="sk-test", max_retries=3).judge(samples)
    assert verdicts == [1, -1, 1, None, None, -1, None, 1, None, 0]
    tries = {c: sum(1 for r in server.requests if r[3] == c) for c in cases}
    # 3 tries at most; a 401 is not retried; a sample without an answer is not sent
    assert tries == {"yes": 1, "no": 1, "flaky": 3, "down": 3, "slow": 3, "slowonce": 2,
                     "gibberish": 3, "badjson": 2, "auth": 1}
    path, headers, body, _ = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert "Final choice: Response 2" in body["messages"][0]["content"][-1]["text"]


def test_openai_judge_failures_count_in_compute_rewards(server):
    texts = [_case("yes").response, _case("down").response, _case("no", 1).response]
    rb = compute_rewards(texts, [2, 2, 2], _judge(server, max_retries=3))
    # yes → 0.5 + 1.5; server down → 0.5 + 1 (counted); wrong answer → 0.5, not sent
    assert rb.total.tolist() == [2.0, 1.5, 0.5]
    assert rb.judge_failures == 1 and rb.judged == 2


def test_openai_judge_sends_image_and_bounds_concurrency(server, tmp_path):
    img = tmp_path / "pic.png"
    img.write_bytes(b"\x89PNG fake bytes")
    samples = [_case("busy", image=str(img))] * 6
    # the base URL without /v1 is completed to /v1/chat/completions
    judge = OpenAIJudge(f"http://127.0.0.1:{server.server_address[1]}", "m", timeout=2.0,
                        concurrency=2, backoff=0.0)
    assert judge.judge(samples) == [1] * 6
    assert server.max_in_flight == 2
    content = server.requests[0][2]["messages"][0]["content"]
    url = content[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == b"\x89PNG fake bytes"
    assert server.requests[0][0] == "/v1/chat/completions"


def test_openai_judge_inside_running_event_loop(server):
    judge = _judge(server)

    async def caller():  # e.g. called from an async server: judge() must still work
        return judge.judge([_case("yes")]), await judge.ajudge([_case("no")])

    assert asyncio.run(caller()) == ([1], [-1])


def test_openai_judge_unreachable_and_bad_settings():
    # nothing listens on port 9 (discard) on loopback: connection refused, 3 tries, None
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", timeout=0.5, backoff=0.0)
    assert judge.judge([_case("yes")]) == [None]
    with pytest.raises(ValueError, match="base_url"):
        OpenAIJudge("localhost:8000", "m")
    with pytest.raises(ValueError, match="max_retries"):
        OpenAIJudge("http://x/v1", "m", max_retries=0)
