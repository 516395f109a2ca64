#!/usr/bin/env python3
"""Reference chat-template renderer: transformers' apply_chat_template environment, reproduced with
plain jinja2 (no torch/transformers needed), to check kiln's C++ Jinja interpreter byte for byte.

Copied settings (transformers/utils/chat_template_utils.py, _compile_jinja_template):
  ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                extensions=[AssistantTracker ({% generation %}), loopcontrols])
  filters["tojson"] = json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
  globals["raise_exception"] raises TemplateError; globals["strftime_now"] = datetime.now().strftime
and apply_chat_template's render call: messages, tools (None when absent), documents=None,
add_generation_prompt, then bos_token/eos_token and extra variables.

Messages are normalized as kiln's chat::normalize_messages does (vLLM's conventions): all-text
content parts joined with "\\n"; assistant tool_calls null/[] dropped; tool-call "arguments" given
as a JSON string parsed to an object (None/"" -> {}).

KILN_DATE_OVERRIDE=YYYY-MM-DD[ HH:MM:SS] pins strftime_now's clock (kiln honours it too).

CLI: chat_reference.py TEMPLATE.jinja --messages M.json [--tools T.json] [--add_generation_prompt]
     [--var NAME=VALUE ...]   (VALUE parsed as JSON if valid, else a string; bos_token/eos_token
     are plain variables here). Prints the prompt with no added newline.
"""
import argparse
import copy
import json
import os
import sys
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class AssistantTracker(Extension):
    """transformers' {% generation %} tag: renders its body (index tracking is not needed here)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _generation_support(self, context, caller):
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def now():
    pinned = os.environ.get("KILN_DATE_OVERRIDE", "")
    if pinned:
        for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
            try:
                return datetime.strptime(pinned, fmt)
            except ValueError:
                pass
    return datetime.now()


def strftime_now(format):
    return now().strftime(format)


def make_environment():
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[AssistantTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def normalize_messages(messages):
    out = []
    for m in copy.deepcopy(messages):
        content = m.get("content")
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
        ):
            m["content"] = "\n".join(p["text"] for p in content)
        if "tool_calls" in m:
            calls = m["tool_calls"]
            if calls is None or calls == []:
                del m["tool_calls"]
            elif isinstance(calls, list) and m.get("role") == "assistant":
                for c in calls:
                    if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
                        continue
                    fn = c["function"]
                    args = fn.get("arguments")
                    if args is None or args == "":
                        fn["arguments"] = {}
                    elif isinstance(args, str):
                        fn["arguments"] = json.loads(args)
        out.append(m)
    return out


def render(source, messages, tools=None, add_generation_prompt=False, bos_token="", eos_token="", extra=None):
    template = make_environment().from_string(source)
    kwargs = {"bos_token": bos_token, "eos_token": eos_token}
    kwargs.update(extra or {})
    return template.render(
        messages=normalize_messages(messages),
        tools=tools,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


def parse_var(text):
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--var expects NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("template")
    ap.add_argument("--messages", required=True)
    ap.add_argument("--tools")
    ap.add_argument("--add_generation_prompt", action="store_true")
    ap.add_argument("--var", action="append", default=[])
    a = ap.parse_args()
    with open(a.template, encoding="utf-8") as f:
        source = f.read()
    with open(a.messages, encoding="utf-8") as f:
        messages = json.load(f)
    tools = None
    if a.tools:
        with open(a.tools, encoding="utf-8") as f:
            tools = json.load(f)
    extra = dict(parse_var(v) for v in a.var)
    try:
        out = render(source, messages, tools, a.add_generation_prompt, extra=extra)
    except Exception as e:  # noqa: BLE001 - report any template failure like kiln does
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
