"""Conformance of kiln's chat-template interpreter with Python jinja2 under transformers' settings:
every real template in ../shared/assets/templates x several conversations x add_generation_prompt
renders byte-identical through `kiln template` and tools/chat_reference.py, or both raise."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import chat_reference  # noqa: E402

PINNED_DATE = "2024-07-26 09:30:00"

# bos/eos as the models' tokenizer_config.json have them (Qwen and SmolLM3 have no bos).
TOKENS = {
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    "HuggingFaceTB-SmolLM3-3B": ("", "<|im_end|>"),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("<|begin_of_text|>", "<|im_end|>"),
    "Qwen-Qwen2.5-7B-Instruct": ("", "<|im_end|>"),
    "Qwen-Qwen3-0.6B": ("", "<|im_end|>"),
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "google-gemma-2-2b-it": ("<bos>", "<eos>"),
    "ibm-granite-granite-3.3-2B-Instruct": ("<|end_of_text|>", "<|end_of_text|>"),
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "microsoft-Phi-3.5-mini-instruct": ("<s>", "<|endoftext|>"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>"),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
                "days": {"type": "integer", "description": "Days of forecast"},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone. Returns ISO 8601 “local” time.",
        "parameters": {"type": "object", "properties": {"tz": {"type": ["string", "null"], "description": "IANA zone"}}},
    },
}

CONVERSATIONS = {
    "single": ([{"role": "user", "content": "Hello! What's 2+2?"}], None),
    "system_user": (
        [
            {"role": "system", "content": "You are a terse assistant. Answer in one line."},
            {"role": "user", "content": "Name three primes."},
        ],
        None,
    ),
    "multi_turn": (
        [
            {"role": "system", "content": "  Be helpful; use \"quotes\" and 'apostrophes'.\n"},
            {"role": "user", "content": "Café, naïve, 日本語, emoji 🙂 — translate?"},
            {"role": "assistant", "content": "<think>\nThe user wants...\n</think>\n\nSure: café → coffee."},
            {"role": "user", "content": [{"type": "text", "text": "Thanks."}, {"type": "text", "text": "One more: \\n tab\t?"}]},
        ],
        None,
    ),
    "tools": (
        [
            {"role": "system", "content": "You can call tools."},
            {"role": "user", "content": "What's the weather in Paris, in celsius?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call0A1b2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\", \"days\": 1}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call0A1b2", "name": "get_weather", "content": "{\"temp\": 21.5, \"sky\": \"clear\"}"},
            {"role": "assistant", "content": "It is 21.5 °C and clear in Paris."},
            {"role": "user", "content": "And the time there?"},
        ],
        [WEATHER_TOOL, TIME_TOOL],
    ),
    "tools_pending": (
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "xYz987abc", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
                ],
            },
            {"role": "tool", "tool_call_id": "xYz987abc", "content": "-3 degrees"},
        ],
        [WEATHER_TOOL],
    ),
}

# Extra variables some templates read.
VARIANTS = {
    "Qwen-Qwen3-0.6B": [{}, {"enable_thinking": False}],
    "HuggingFaceTB-SmolLM3-3B": [{}, {"enable_thinking": False}],
    "meta-llama-Llama-3.1-8B-Instruct": [{}, {"tools_in_user_message": False}],
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": [{}, {"enable_thinking": True}],
    "ibm-granite-granite-3.3-2B-Instruct": [{}, {"thinking": True}],
}


def template_files(assets):
    files = sorted((assets / "templates").glob("*.jinja"))
    assert files, "no templates in assets/templates"
    return files


def cases():
    for name in TOKENS:
        for conv in CONVERSATIONS:
            for agp in (False, True):
                for vi, _ in enumerate(VARIANTS.get(name, [{}])):
                    yield pytest.param(name, conv, agp, vi, id=f"{name}-{conv}-{'agp' if agp else 'noagp'}-v{vi}")


def reference(source, name, conv, agp, variant):
    messages, tools = CONVERSATIONS[conv]
    bos, eos = TOKENS[name]
    os.environ["KILN_DATE_OVERRIDE"] = PINNED_DATE
    try:
        return chat_reference.render(source, messages, tools, agp, bos, eos, variant), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def kiln(kiln_bin, path, name, conv, agp, variant, tmp_path):
    messages, tools = CONVERSATIONS[conv]
    bos, eos = TOKENS[name]
    mfile = tmp_path / "messages.json"
    mfile.write_text(json.dumps(messages, ensure_ascii=False), encoding="utf-8")
    cmd = [kiln_bin, "template", str(path), "--messages", str(mfile)]
    if tools is not None:
        tfile = tmp_path / "tools.json"
        tfile.write_text(json.dumps(tools, ensure_ascii=False), encoding="utf-8")
        cmd += ["--tools", str(tfile)]
    if agp:
        cmd.append("--add_generation_prompt")
    for k, v in {"bos_token": bos, "eos_token": eos, **variant}.items():
        cmd += ["--var", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    env = dict(os.environ, KILN_DATE_OVERRIDE=PINNED_DATE)
    p = subprocess.run(cmd, capture_output=True, env=env, timeout=60)
    if p.returncode != 0:
        return None, p.stderr.decode("utf-8", "replace")
    return p.stdout.decode("utf-8"), None


@pytest.mark.parametrize("name,conv,agp,vi", list(cases()))
def test_template_matches_jinja2(kiln_bin, assets, tmp_path, name, conv, agp, vi):
    path = assets / "templates" / f"{name}.jinja"
    if not path.exists():
        pytest.skip(f"{path} missing")
    variant = VARIANTS.get(name, [{}])[vi]
    source = path.read_text(encoding="utf-8")
    want, want_err = reference(source, name, conv, agp, variant)
    got, got_err = kiln(kiln_bin, path, name, conv, agp, variant, tmp_path)
    if want_err is not None:
        assert got_err is not None, f"jinja2 raised ({want_err}) but kiln rendered:\n{got!r}"
        assert "Traceback" not in got_err
        return
    assert got_err is None, f"kiln failed: {got_err}\njinja2 rendered:\n{want!r}"
    if got != want:
        # Show the first difference, not two walls of text.
        i = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), min(len(got), len(want)))
        pytest.fail(f"first difference at char {i}:\n kiln : {got[max(0, i - 80):i + 80]!r}\n jinja: {want[max(0, i - 80):i + 80]!r}")


def test_every_asset_template_is_covered(assets):
    names = {p.stem for p in template_files(assets)}
    assert names <= set(TOKENS), f"templates without bos/eos entries: {sorted(names - set(TOKENS))}"


def test_template_verb_errors_name_the_line(kiln_bin, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("line one\n{% for m in messages %}\n{{ m.content }\n", encoding="utf-8")
    msgs = tmp_path / "m.json"
    msgs.write_text('[{"role": "user", "content": "hi"}]')
    p = subprocess.run([kiln_bin, "template", str(bad), "--messages", str(msgs)], capture_output=True, timeout=60)
    assert p.returncode != 0
    err = p.stderr.decode()
    assert "bad.jinja:3:" in err, err


def test_template_verb_model_dir_and_raise(kiln_bin, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<B>"}, "eos_token": "<E>",
        "chat_template": [
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}"},
            {"name": "tool_use", "template": "{{ raise_exception('tools: ' ~ tools|length) }}"},
        ],
    }))
    msgs = tmp_path / "m.json"
    msgs.write_text('[{"role": "user", "content": "hi"}]')
    p = subprocess.run([kiln_bin, "template", str(d), "--messages", str(msgs)], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"<B>hi<E>"
    tools = tmp_path / "t.json"
    tools.write_text("[{}]")
    p = subprocess.run([kiln_bin, "template", str(d), "--messages", str(msgs), "--tools", str(tools)], capture_output=True, timeout=60)
    assert p.returncode != 0
    assert "tools: 1" in p.stderr.decode()


def test_template_verb_reads_gguf(kiln_bin, tmp_path):
    model = os.environ.get("KILN_DEFAULT_MODEL", "")
    if not model or not os.path.exists(model):
        pytest.skip("KILN_DEFAULT_MODEL (the SmolLM2 GGUF from `make model`) not available")
    msgs = tmp_path / "m.json"
    msgs.write_text('[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]')
    p = subprocess.run([kiln_bin, "template", model, "--messages", str(msgs), "--add_generation_prompt"],
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                 "<|im_start|>assistant\n")
