"""`kiln serve` end to end with the official openai SDK against the default model (SmolLM2-135M
Q4_1 GGUF, KILN_DEFAULT_MODEL): chat and completions, streamed and not, n, stop, logprobs,
include_usage, seed reproducibility, echo + logprobs (prompt logprobs), errors as the SDK's exception classes, and 32 concurrent
streams that must match their solo greedy outputs. max_tokens stay small: the model runs on CPU."""
import concurrent.futures
import json
import os
import urllib.request

import openai
import pytest

from test_server_util import API_KEY, KilnServer, default_model

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def server(kiln_bin):
    with KilnServer(kiln_bin, default_model(), "--api_key", API_KEY, "--max_seq_len", "1024") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smol"]
    assert client.models.retrieve("smol").id == "smol"


def test_completion_stream_matches_plain(client):
    plain = client.completions.create(model="smol", prompt=PROMPT, max_tokens=12, temperature=0)
    choice = plain.choices[0]
    assert plain.object == "text_completion" and plain.id.startswith("cmpl-")
    assert choice.text and choice.finish_reason in ("length", "stop")
    assert plain.usage.prompt_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(client.completions.create(model="smol", prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_matches_plain(client):
    plain = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=12, temperature=0)
    msg = plain.choices[0].message
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    assert msg.role == "assistant" and msg.content
    stream = list(client.chat.completions.create(model="smol", messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert stream[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == msg.content
    final = [c for c in stream if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == plain.choices[0].finish_reason
    # include_usage: one last chunk with usage and no choices.
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in stream[:-1])


def test_chat_content_parts_and_roles(client):
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello."}]}]
    r = client.chat.completions.create(model="smol", messages=messages, max_completion_tokens=4, temperature=0)
    assert r.usage.completion_tokens <= 4


def test_n_and_seed_reproducible(client):
    kw = dict(model="smol", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert 3 <= a.usage.completion_tokens <= 24
    c = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=8, temperature=1.0, seed=7)
    d = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=8, temperature=1.0, seed=7)
    assert c.choices[0].message.content == d.choices[0].message.content
    texts = {client.completions.create(model="smol", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=s).choices[0].text
             for s in range(4)}
    assert len(texts) > 1


# The prompt row's logprob comes from a prefill over the whole prompt, the reference from a prefill
# over the prefix: the same math on the CPU (f32, batch-invariant: 1e-3 is rounding), but on the GPU
# BF16 activations and GEMMs chosen per token count differ by ~1e-2 in the logits (H100, s2 final
# e2e run: 0.016 at one position), so the GPU run allows 0.05.
PREFIX_LOGPROB_TOL = 5e-2 if os.environ.get("KILN_TEST_DEVICE", "cpu").startswith("cuda") else 1e-3
# A greedy choice whose top-2 logprob gap is under this may differ between batch shapes (GPU only).
TIE_LOGPROB_GAP = 5e-2 if os.environ.get("KILN_TEST_DEVICE", "cpu").startswith("cuda") else 0.0


def test_stop_strings(client):
    full = client.completions.create(model="smol", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = full[:full.index(stop)]
    r = client.completions.create(model="smol", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "\u2603"])
    assert r.choices[0].text == cut
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="smol", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.completions.create(model="smol", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    # Greedy: the sampled token is the most likely one.
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        assert max(top.values()) == pytest.approx(top[tok], abs=1e-4)
    c = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.bytes == list(item.token.encode())
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob


def _tokenize(server, text):
    req = urllib.request.Request(server.base + "/tokenize", data=json.dumps({"prompt": text}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["tokens"]


def _check_echo_logprobs(lp, n_prompt, n_total, k):
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_total
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first token
    for tok, v, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert v <= 0 and top[tok] == pytest.approx(v, abs=1e-6)
        assert 1 <= len(top) <= k + 1  # the top k plus the actual token
        assert max(top.values()) >= v - 1e-6
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_logprobs_scores_the_prompt(server, client):
    """echo + logprobs (issue #4): the prompt's tokens lead the logprobs, with max_tokens 3 and with
    max_tokens 0 (lm-eval-harness's loglikelihood call), streamed and not."""
    prompt = "1, 2, 3, 4, 5, 6, 7, 8,"
    ids = _tokenize(server, prompt)
    n = len(ids)
    gen = client.completions.create(model="smol", prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    r = client.completions.create(model="smol", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text == prompt + gen.choices[0].text
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens == 3
    _check_echo_logprobs(c.logprobs, n, n + 3, 2)
    # The generated part is what a plain logprobs request reports.
    assert c.logprobs.tokens[n:] == gen.choices[0].logprobs.tokens
    assert c.logprobs.token_logprobs[n:] == pytest.approx(gen.choices[0].logprobs.token_logprobs, abs=1e-4)

    score = client.completions.create(model="smol", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    s = score.choices[0]
    assert s.text == prompt and s.finish_reason == "length"
    assert score.usage.completion_tokens == 0
    _check_echo_logprobs(s.logprobs, n, n, 2)
    assert s.logprobs.tokens == c.logprobs.tokens[:n]
    assert s.logprobs.token_logprobs[1:] == pytest.approx(c.logprobs.token_logprobs[1:n], abs=1e-4)

    # Consistency with generation: prompt token i's logprob is what kiln reports for token i when it
    # is a candidate after tokens < i (the top 20 of a plain request from that prefix).
    matched = 0
    for i in range(1, n):
        step = client.completions.create(model="smol", prompt=ids[:i], max_tokens=1, temperature=0, logprobs=20)
        top = step.choices[0].logprobs.top_logprobs[0]
        tok = s.logprobs.tokens[i]
        if tok in top:
            assert top[tok] == pytest.approx(s.logprobs.token_logprobs[i], abs=PREFIX_LOGPROB_TOL), (i, tok)
            matched += 1
    assert matched >= n // 2, f"only {matched} of {n - 1} prompt tokens were in the model's top 20"

    # Streaming: the first chunk carries the echoed prompt and its logprobs.
    chunks = list(client.completions.create(model="smol", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    first = chunks[0].choices[0]
    assert first.text.startswith(prompt)
    assert first.logprobs.tokens[:n] == s.logprobs.tokens and first.logprobs.token_logprobs[0] is None
    streamed_tokens = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert streamed_tokens == c.logprobs.tokens
    chunks = list(client.completions.create(model="smol", prompt=prompt, max_tokens=0, echo=True, logprobs=2,
                                            stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == prompt
    assert chunks[0].choices[0].logprobs.tokens == s.logprobs.tokens
    # Without echo, max_tokens 0 is refused.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smol", prompt=prompt, max_tokens=0)


def test_errors_map_to_sdk_exceptions(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt=PROMPT, temperature=5)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt=PROMPT, max_tokens=5000)
    assert "maximum context length is 1024 tokens" in str(e.value) and "5000 in the completion" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-served", prompt=PROMPT, max_tokens=1)
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smol", prompt=PROMPT, max_tokens=2, extra_body={"top_k": -7})


def test_extra_sampling_params(client):
    r = client.completions.create(model="smol", prompt=PROMPT, max_tokens=6, temperature=0.8, top_p=0.9, seed=3,
                                  presence_penalty=0.5, frequency_penalty=0.5,
                                  extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                              "ignore_eos": True, "min_tokens": 6})
    assert r.usage.completion_tokens == 6
    # logit_bias of +100 on one token makes greedy decoding emit it every time.
    forced = client.completions.create(model="smol", prompt=PROMPT, max_tokens=3, temperature=0,
                                       logit_bias={"28": 100}, logprobs=0)
    assert len(set(forced.choices[0].logprobs.tokens)) == 1, forced.choices[0].logprobs.tokens


def test_concurrent_streams_match_solo(client):
    """32 concurrent streaming clients each receive exactly their solo greedy tokens. On the CPU the
    forward pass is batch-invariant, so the tokens must be identical. On the GPU, BF16 GEMMs picked
    per batch size move logits by ~1e-2, so a stream may leave its solo path only where the solo
    run's top two candidates were that close (a near-tie), never at a clear choice: a token from
    another request, or a dropped or repeated one, still fails."""
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(32)]
    tie = TIE_LOGPROB_GAP

    def solo(p):
        lp = client.completions.create(model="smol", prompt=p, max_tokens=6, temperature=0, logprobs=2).choices[0].logprobs
        return lp.tokens, lp.top_logprobs

    def streamed(p):
        s = client.completions.create(model="smol", prompt=p, max_tokens=6, temperature=0, stream=True, logprobs=2)
        return [t for c in s if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]

    alone = [solo(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        together = list(pool.map(streamed, prompts))
    diverged = 0
    for k, ((want, tops), got) in enumerate(zip(alone, together)):
        if got == want:
            continue
        i = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        assert i < len(want) and i < len(got), (k, want, got)  # a shorter or longer stream is never a tie
        best = sorted(tops[i].values(), reverse=True)
        assert len(best) >= 2 and best[0] - best[1] <= tie, (k, i, want, got, tops[i])
        diverged += 1
    assert diverged <= 4, f"{diverged} of 32 streams left their solo path at near-ties"
