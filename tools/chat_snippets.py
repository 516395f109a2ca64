#!/usr/bin/env python3
"""The table of small Jinja snippets that tests/chat (GoogleTest) renders with kiln's interpreter.
Expected outputs come from Python jinja2 under transformers' settings (tools/chat_reference.py).

  tools/chat_snippets.py --write   regenerate tests/chat/jinja_snippets.json
  tools/chat_snippets.py --check   exit 1 if the fixture differs from what jinja2 renders now

Each case: template, context (JSON object, passed as render variables) and either "expected"
(the exact output) or "error": true (jinja2 raises at parse or render time).
"""
import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import chat_reference  # noqa: E402

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "chat" / "jinja_snippets.json"

MSGS = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
    {"role": "user", "content": "bye"},
]

# (template, context); context defaults to {}.
CASES = [
    # --- output, literals, repr
    ("plain text", {}),
    ("{{ 'a' }}{{ \"b\" }}{{ 'it''s' }}", {}),
    ("{{ 'esc: \\n\\t\\\\ \\' \\\" \\x41 \\u00e9 \\U0001F600 \\d' }}", {}),
    ("{{ 1 }} {{ -2 }} {{ 1.0 }} {{ 1.5e3 }} {{ 1e20 }} {{ 1e-5 }} {{ 0.1 + 0.2 }} {{ 1_000 }}", {}),
    ("{{ 3 / 2 }} {{ 4 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }} {{ 2 ** 10 }} {{ 2 ** -1 }}", {}),
    ("{{ true }} {{ false }} {{ none }} {{ True }} {{ None }}", {}),
    ("{{ [1, 'a', none, true, 1.5, [2], {'k': 'v'}] }}", {}),
    ("{{ (1, 2) }} {{ (1,) }} {{ () }} {{ {'a': 1, 'b': [1, 2]} }} {{ {} }}", {}),
    ("{{ \"it's\" ~ ['it\\'s', 'say \"hi\"', 'both \\' \"', 'nl\\n'] }}", {}),
    ("{{ ['é', '\\u00a0', '\\x7f'] }}", {}),
    ("{{ x }}|{{ x.y is defined }}|{{ none }}", {"x": {"y": None}}),
    ("{{ 'a' 'b' }}", {}),
    # --- whitespace control, trim_blocks, lstrip_blocks, comments
    ("{% if true %}\nA\n{% endif %}\nB", {}),
    ("  {% if true %}\n  X\n  {% endif %}\nY", {}),
    ("a  {%- if true -%}  b  {%- endif -%}  c", {}),
    ("a  {{- 'x' -}}  b", {}),
    ("a\n  {%+ if true %}b{% endif %}", {}),
    ("a {% if true +%}\nb{% endif %}", {}),
    ("x {# comment #}\ny", {}),
    ("x\n  {# comment #}\ny", {}),
    ("x {#- c -#} y", {}),
    ("{% raw %}{{ not rendered }}{% endraw %}", {}),
    ("line\n", {}),
    ("line\n\n", {}),
    ("a\r\nb\rc", {}),
    ("  {{ 'v' }}\n  {% set x = 1 %}\n", {}),
    ("{% for i in [1, 2] %}\n  {{ i }}\n{% endfor %}\n", {}),
    # --- if / elif / else, inline if
    ("{% if x > 2 %}big{% elif x > 1 %}mid{% else %}small{% endif %}", {"x": 2}),
    ("{% if x %}t{% else %}f{% endif %}|{% if not x %}n{% endif %}", {"x": []}),
    ("{{ 'y' if x else 'n' }}|{{ 'y' if not x }}|", {"x": 0}),
    ("{{ x and 'a' }}|{{ x or 'b' }}|{{ 0 or '' or 'c' }}|{{ 1 and 2 }}", {"x": ""}),
    # --- comparisons, in, not, chains
    ("{{ 1 < 2 < 3 }} {{ 1 < 3 < 2 }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }} {{ 1 == 1.0 }} {{ true == 1 }} {{ 'a' != 'b' }}", {}),
    ("{{ 'b' in 'abc' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 3 not in [1] }} {{ not 1 in [1] }}", {}),
    ("{{ x in y }}", {"x": "a"}),
    ("{{ 1 < 'a' }}", {}),
    ("{{ 1 + 'a' }}", {}),
    ("{{ 'a' + 1 }}", {}),
    ("{{ 'ab' * 3 }} {{ [0] * 3 }} {{ 3 * 'x' }} {{ 'a' ~ 1 ~ none ~ undefined_var }}", {}),
    ("{{ -x }} {{ +x }} {{ - 2 ** 2 }}", {"x": 3}),
    ("{{ 1 / 0 }}", {}),
    # --- for loops and loop.*
    ("{% for m in msgs %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.revindex }}/{{ loop.revindex0 }}/{{ loop.first }}/{{ loop.last }}/{{ loop.length }} {% endfor %}", {"msgs": MSGS}),
    ("{% for m in msgs %}[{{ loop.previtem.role if loop.previtem is defined else '-' }}>{{ m.role }}>{{ loop.nextitem.role if loop.nextitem is defined else '-' }}]{% endfor %}", {"msgs": MSGS}),
    ("{% for x in [] %}a{% else %}empty{% endfor %}", {}),
    ("{% for x in [1, 2] %}{{ x }}{% break %}{% else %}else-after-break{% endfor %}|{% for x in [1] %}{% continue %}{% else %}else-after-continue{% endfor %}|{% for x in [1] %}{% else %}no{% endfor %}", {}),
    ("{{ range(3) }} {{ range(1, 9, 2)[1:] }} {{ range(5)[::-1] | list }} {{ range(3) == [0, 1, 2] }} {{ {'a': 1}.keys() }} {{ {'a': 1}.items() }} {{ {'a': 1}.values() | list }}", {}),
    ("{{ range(3) + [1] }}", {}),
    ("{{ range(2) | tojson }}", {}),
    ("{{ x[1:] }}", {"x": 5}),
    ("{{ d[1:] }}", {"d": {}}),
    ("{{ 'a' | indent }}|{{ 5 | indent }}", {}),
    ("{% set g = [1, 'x'] | map('int') %}{{ 'lazy' }}{% set h = true | select %}{{ 'ok' }}", {}),
    ("{{ [1, 2, 3] | select('odd') | first }}{{ [2, 'a'] | map('abs') | first }}", {}),
    ("x {#+ keep #}\ny", {}),
    ("{{ '<a>' + ('<b>' | safe) }}|{{ ('<b>' | safe) + '<a>' }}|{{ '<' ~ ('<b>' | safe) }}|{{ ['x' | safe, 'y' | e] }}|{{ '&' | e | e }}|{{ '&' | forceescape | forceescape }}", {}),
    ("{{ ('<%s>' | safe) % '<x>' }}|{{ '%s' | safe | format('<y>') }}|{{ ('a<b' | safe).upper() }}|{{ ('<p>' | safe).replace('p', '<q>') }}|{{ ('a b' | safe).split() }}|{{ ('-' | safe).join(['<', '>']) }}|{{ ('<x>' | safe)[1:] }}|{{ ('<x>' | safe) | upper | length }}", {}),
    ("{% for x in [1, 2, 3, 4] if x % 2 == 0 %}{{ x }}{{ loop.length }}{% endfor %}", {}),
    ("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}", {}),
    ("{% for k in {'z': 1, 'a': 2} %}{{ k }}{% endfor %}", {}),
    ("{% for c in 'héllo' %}{{ c }}.{% endfor %}", {}),
    ("{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %}", {}),
    ("{% for x in [1, 2, 3, 4, 5] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}", {}),
    ("{% for i in range(3) %}{{ loop.cycle('a', 'b') }}{% endfor %}", {}),
    ("{% for i in [1, 1, 2] %}{% if loop.changed(i) %}{{ i }}{% endif %}{% endfor %}", {}),
    ("{% for x in tree recursive %}{{ x.n }}{{ loop.depth }}{% if x.c %}({{ loop(x.c) }}){% endif %};{% endfor %}", {"tree": [{"n": "a", "c": [{"n": "b", "c": [{"n": "c"}]}, {"n": "d"}]}, {"n": "e"}]}),
    ("{% for x in [1] %}{{ loop([2]) }}{% endfor %}", {}),
    ("{% for i in range(2) %}{% for j in range(2) %}{{ i }}{{ j }}{{ loop.index }} {% endfor %}{{ loop.index }}|{% endfor %}", {}),
    ("{% for x in undefined_thing %}a{% else %}none{% endfor %}", {}),
    ("{% for x in none %}a{% endfor %}", {}),
    ("{% for x in 5 %}a{% endfor %}", {}),
    ("{{ range(5) | list }} {{ range(1, 10, 3) | list }} {{ range(5, 0, -2) | list }}", {}),
    # --- set, scoping, namespace
    ("{% set x = 1 %}{% for i in [1, 2] %}{{ x }}{% set x = i * 10 %}{{ x }} {% endfor %}{{ x }}", {}),
    ("{% set ns = namespace(total=0, items=[]) %}{% for i in [1, 2, 3] %}{% set ns.total = ns.total + i %}{% set ns.items = ns.items + [i] %}{% endfor %}{{ ns.total }} {{ ns.items }}", {}),
    ("{% set ns = namespace() %}{% set ns.a = 'x' %}{{ ns.a }}{{ ns.b is defined }}", {}),
    ("{% set d = {'a': 1} %}{% set d.a = 2 %}", {}),
    ("{% set a, b = [1, 2] %}{{ b }}{{ a }}", {}),
    ("{% set a, b = 1, 2 %}{{ a + b }}", {}),
    ("{% set t %}block {{ 1 + 1 }}{% endset %}[{{ t }}]", {}),
    ("{% set t | upper | trim %}  shout {% endset %}[{{ t }}]", {}),
    ("{% if true %}{% set x = 5 %}{% endif %}{{ x }}", {}),
    ("{% set messages = messages[1:] %}{{ messages | length }}", {"messages": MSGS}),
    ("{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}{{ a is defined }}", {}),
    # --- macros and call
    ("{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Bob') }} {{ greet('Al', punct='?') }} {{ greet(name='X') }}", {}),
    ("{% macro f(a, b) %}{{ a }}|{{ b }}|{{ b is defined }}{% endmacro %}{{ f(1) }}", {}),
    ("{% macro f() %}{{ varargs }}{{ kwargs }}{% endmacro %}{{ f(1, 2, k=3) }}", {}),
    ("{% macro f(a) %}{{ a }}{% endmacro %}{{ f(1, 2) }}", {}),
    ("{% macro f(a) %}{{ a }}{% endmacro %}{{ f(b=2) }}", {}),
    ("{% macro wrap(tag) %}<{{ tag }}>{{ caller() }}</{{ tag }}>{% endmacro %}{% call wrap('b') %}bold {{ 1 + 1 }}{% endcall %}", {}),
    ("{% macro each(items) %}{% for i in items %}{{ caller(i) }}{% endfor %}{% endmacro %}{% call(x) each([1, 2]) %}[{{ x }}]{% endcall %}", {}),
    ("{% macro rec(n) %}{{ n }}{% if n > 0 %}{{ rec(n - 1) }}{% endif %}{% endmacro %}{{ rec(3) }}", {}),
    ("{% macro m() %}{{ outer }}{% endmacro %}{% set outer = 'late' %}{{ m() }}", {}),
    ("{% macro m() %}{% set inner = 1 %}{{ inner }}{% endmacro %}{{ m() }}{{ inner is defined }}", {}),
    ("{{ 'x' + m() }}{% macro m() %}y{% endmacro %}", {}),
    ("{% macro m() %}y{% endmacro %}{{ 'x' + m() + 'z' }}", {}),
    # --- generation tag, filter block
    ("{% for m in msgs %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}{% endfor %}", {"msgs": MSGS}),
    ("{% filter upper %}abc {{ 'def' }}{% endfilter %}", {}),
    # --- attribute / item access, slices
    ("{{ msgs[0].role }} {{ msgs[0]['content'] }} {{ msgs[-1].content }} {{ msgs[2].tool_calls[0].function.arguments.a }}", {"msgs": MSGS}),
    ("{{ msgs[9] is defined }} {{ msgs[0].nope is defined }} {{ msgs[0]['nope'] is defined }}", {"msgs": MSGS}),
    ("{{ x.foo }}", {}),
    ("{{ x.foo.bar }}", {"x": {}}),
    ("{{ x['a'] }}", {}),
    ("{{ none.attr is defined }} {{ 5.attr is defined }}", {}),
    ("{{ d['items'] }}{{ d.items is defined }}{{ d.get('items') }}", {"d": {"items": 1}}),
    ("{{ s[0] }}{{ s[-1] }}{{ s[1:3] }}{{ s[::-1] }}{{ s[::2] }}{{ s[10:] }}|{{ s[-2:] }}", {"s": "héllo"}),
    ("{{ l[1:] }} {{ l[:-1] }} {{ l[::-1] }} {{ l[-10:10:3] }} {{ l[5:1:-2] }}", {"l": [0, 1, 2, 3, 4, 5, 6]}),
    ("{{ l[::0] }}", {"l": [1]}),
    ("{{ 'abc'.0 }}{{ l.1 }}", {"l": [1, 2]}),
    # --- tests
    ("{{ x is defined }} {{ y is undefined }} {{ none is none }} {{ 'a' is string }} {{ 1 is number }} {{ 1.5 is number }} {{ true is number }}", {"x": 1}),
    ("{{ 1 is integer }} {{ true is integer }} {{ 1.0 is float }} {{ true is boolean }} {{ 1 is boolean }} {{ true is true }} {{ 1 is true }} {{ false is false }}", {}),
    ("{{ {} is mapping }} {{ [] is mapping }} {{ [] is iterable }} {{ 'a' is iterable }} {{ 1 is iterable }} {{ undefined_x is iterable }} {{ {} is sequence }} {{ 'a' is sequence }} {{ 3 is sequence }}", {}),
    ("{{ 'a' is equalto 'a' }} {{ 1 is eq 1 }} {{ 1 is ne 2 }} {{ 2 is gt 1 }} {{ 2 is ge 2 }} {{ 1 is lt 2 }} {{ 1 is le 0 }} {{ 2 is in [1, 2] }} {{ 'x' is sameas 'x' }}", {}),
    ("{{ 4 is even }} {{ 3 is odd }} {{ 9 is divisibleby 3 }} {{ 'abc' is lower }} {{ 'ABC' is upper }} {{ 'upper' is filter }} {{ 'odd' is test }} {{ 'nope' is filter }}", {}),
    ("{{ x is not none }} {{ not x is none }} {{ x is not defined }}", {"x": None}),
    ("{{ f is callable }} {{ range is callable }} {{ 1 is callable }}", {}),
    # --- filters
    ("{{ '  pad  ' | trim }}|{{ 'xxhixx' | trim('x') }}|{{ ' \\t\\n a \\u3000' | trim }}|{{ 'Hello World' | upper }}|{{ 'ÉCOLE' | lower }}|{{ 'ßtraße' | upper }}", {}),
    ("{{ 'hello wORLD-foo(bar)' | title }}|{{ \"they're bill's\" | title }}|{{ 'hELLO world' | capitalize }}", {}),
    ("{{ 'héllo' | length }} {{ [1, 2] | count }} {{ {'a': 1} | length }} {{ undefined_x | length }}", {}),
    ("{{ 5 | length }}", {}),
    ("{{ x | default('d') }}|{{ none | default('d') }}|{{ '' | default('d', true) }}|{{ 0 | d('z', boolean=true) }}|{{ x | default }}", {}),
    ("{{ [1, 2, 3] | join(', ') }}|{{ ['a', none, 1.5] | join }}|{{ msgs | join('/', attribute='role') }}", {"msgs": MSGS}),
    ("{{ x | tojson }}", {"x": {"b": [1, 2.5, None, True, "é\"\\\n\u0001<>&'"], "a": {}, "c": []}}),
    ("{{ x | tojson(indent=2) }}", {"x": {"b": [1, {"z": None}], "a": {}, "c": []}}),
    ("{{ x | tojson(indent=4) }}|{{ [] | tojson(indent=4) }}|{{ 'é' | tojson(ensure_ascii=true) }}|{{ x | tojson(sort_keys=true) }}", {"x": {"b": 1, "a": "😀"}}),
    ("{{ x | tojson(separators=(',', ':')) }}|{{ 1.0 | tojson }}|{{ 1e100 | tojson }}|{{ 'a' | tojson(indent='\\t') }}", {"x": {"a": [1, 2]}}),
    ("{{ undefined_x | tojson }}", {}),
    ("{{ 'abc' | list }} {{ {'a': 1, 'b': 2} | list }} {{ [3, 1] | first }} {{ [3, 1] | last }} {{ 'xyz' | first }} {{ [] | first is defined }}", {}),
    ("{{ [1, 2, 3] | reverse | list }} {{ 'abc' | reverse }} {{ {'a': 1, 'b': 2} | reverse | list }}", {}),
    ("{{ 'aXbXc' | replace('X', '-') }} {{ 'aaa' | replace('a', 'b', 2) }} {{ 'ab' | replace('', '.') }}", {}),
    ("{{ {'b': 1, 'a': 2} | items | list }} {% for k, v in {'b': 1, 'a': 2} | items %}{{ k }}{{ v }}{% endfor %} {{ undefined_x | items | list }}", {}),
    ("{{ [1, 2] | items | list }}", {}),
    ("{{ msgs | map(attribute='role') | list }} {{ ['a', 'b'] | map('upper') | join }} {{ [1.7, 2.2] | map('int') | list }} {{ msgs | map(attribute='nope', default='z') | list }}", {"msgs": MSGS}),
    ("{{ [0, 1, 2, none, ''] | select | list }} {{ [1, 2, 3, 4] | select('odd') | list }} {{ [1, 2, 3, 4] | reject('gt', 2) | list }} {{ [1, none] | reject('none') | list }}", {}),
    ("{{ msgs | selectattr('role', 'equalto', 'user') | map(attribute='content') | list }} {{ msgs | rejectattr('role', 'eq', 'user') | list | length }} {{ msgs | selectattr('tool_calls') | list | length }} {{ msgs | selectattr('tool_calls', 'defined') | list | length }}", {"msgs": MSGS}),
    ("{{ msgs | selectattr('role', 'equalto', 'user') | list | last }}", {"msgs": MSGS}),
    ("{{ [3, 1, 2] | select | length }}", {}),
    ("{{ [1, 2, 1, 'a', 'A'] | unique | list }} {{ ['a', 'A'] | unique(case_sensitive=true) | list }} {{ msgs | unique(attribute='role') | map(attribute='role') | list }}", {"msgs": MSGS}),
    ("{{ [3, 1, 2] | sort }} {{ ['b', 'A', 'c'] | sort }} {{ ['b', 'A', 'c'] | sort(case_sensitive=true) }} {{ [3, 1, 2] | sort(reverse=true) }} {{ msgs | sort(attribute='role') | map(attribute='content') | join(',') }}", {"msgs": MSGS}),
    ("{{ {'b': 1, 'a': 2, 'C': 0} | dictsort }} {{ {'b': 1, 'a': 2} | dictsort(by='value', reverse=true) }}", {}),
    ("{{ 1 | string }}{{ none | string }}{{ [1] | string }}{{ 'x' | string }}{{ undefined_x | string }}|", {}),
    ("{{ '42' | int }} {{ ' 7 ' | int }} {{ '4.9' | int }} {{ 'x' | int }} {{ 'x' | int(5) }} {{ 3.99 | int }} {{ '1_000' | int }} {{ none | int }} {{ true | int }} {{ '0x1A' | int(0, 16) }}", {}),
    ("{{ '1.5' | float }} {{ 2 | float }} {{ 'x' | float }} {{ ' 1e3 ' | float }} {{ 'inf' | float }} {{ none | float(1.5) }}", {}),
    ("{{ 2.5 | round }} {{ 3.5 | round }} {{ 2.675 | round(2) }} {{ 1.2345 | round(2, 'floor') }} {{ 1.2345 | round(1, 'ceil') }} {{ 5 | round }} {{ -0.5 | round }}", {}),
    ("{{ -3 | abs }} {{ -2.5 | abs }} {{ [1, 2, 3] | sum }} {{ [1.5, 2] | sum }} {{ [[1], [2]] | sum(start=[]) }} {{ [4, 2, 9] | min }} {{ [4, 2, 9] | max }} {{ ['b', 'A'] | max }}", {}),
    ("{{ 'a<b>&\"\\'' | e }}|{{ '<x>' | safe }}|{{ 1 | safe }}", {}),
    ("{{ 'line1\\nline2\\n\\nline4' | indent }}|{{ 'a\\nb' | indent(2, true) }}|{{ 'a\\n\\nb' | indent('> ', blank=true) }}", {}),
    ("{{ '%s is %d years, %.2f%%' | format('Al', 30, 99.5) }} {{ '%(a)s-%(b)05.1f' | format(a='x', b=2.25) }} {{ '%5s|%-5s|%x|%r' % ('a', 'b', 255, 'q') }}", {}),
    ("{{ [1, 2, 3, 4, 5] | batch(2) | list }} {{ [1, 2, 3] | batch(2, 0) | list }}", {}),
    ("{{ 'abc' | center(9) }}|{{ 'a long sentence here' | truncate(12) }}|{{ 'a long sentence here' | truncate(12, true) }}|{{ 'one two  three' | wordcount }}", {}),
    ("{{ msgs | attr('0') is defined }}{{ {'a': 1} | attr('a') is defined }}", {"msgs": MSGS}),
    ("{{ 'x' | nofilter }}", {}),
    ("{{ ['b', 'a'] | sort | first }}{{ [1] | map('nofilter') | list }}", {}),
    # --- string methods
    ("{{ '  a b  '.strip() }}|{{ 'xxa'.lstrip('x') }}|{{ 'a\\n\\n'.rstrip('\\n') }}|{{ 'a,b,,c'.split(',') }}|{{ ' a  b '.split() }}|{{ 'a b c'.split(' ', 1) }}|{{ 'a b c'.rsplit(' ', 1) }}|{{ 'a\\nb\\r\\nc'.splitlines() }}", {}),
    ("{{ 'hello'.startswith('he') }} {{ 'hello'.endswith(('x', 'lo')) }} {{ 'hello'.replace('l', 'L') }} {{ 'hello'.replace('l', 'L', 1) }} {{ 'Hi'.upper() }} {{ 'Hi'.lower() }} {{ 'hi there'.title() }} {{ 'hI'.capitalize() }} {{ 'Hi'.swapcase() }}", {}),
    ("{{ 'héllo'.find('l') }} {{ 'hello'.rfind('l') }} {{ 'hello'.find('z') }} {{ 'hello'.count('l') }} {{ '-'.join(['a', 'b']) }} {{ 'a{}b{}'.format(1, 'x') }} {{ '{0}{name}'.format('p', name='n') }} {{ '{:>5}|{:.2f}|{:03d}'.format('r', 3.14159, 7) }}", {}),
    ("{{ 'abc'.isdigit() }} {{ '123'.isdigit() }} {{ 'ab'.isalpha() }} {{ '  '.isspace() }} {{ 'ab'.islower() }} {{ 'AB'.isupper() }} {{ 'x.txt'.removesuffix('.txt') }} {{ 'a=b=c'.partition('=') }} {{ '7'.zfill(3) }} {{ 'a'.ljust(3) }}|", {}),
    ("{{ content.split('</think>')[-1].lstrip('\\n') }}|{{ content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') }}", {"content": "<think>\nreason\n</think>\n\nanswer"}),
    ("{{ 'a'.nomethod() }}", {}),
    # --- dict and list methods, sandbox
    ("{{ d.keys() | list }} {{ d.values() | list }} {{ d.items() | list }} {{ d.get('a') }} {{ d.get('z') }} {{ d.get('z', 0) }}", {"d": {"a": 1, "b": 2}}),
    ("{% for k, v in d.items() %}{{ k }}:{{ v }} {% endfor %}", {"d": {"x": [1], "y": {"z": 2}}}),
    ("{{ l.index(2) }} {{ l.count(1) }}", {"l": [1, 2, 1]}),
    ("{{ l.append(4) }}", {"l": [1]}),
    ("{{ d.update({'x': 1}) }}", {"d": {}}),
    ("{{ d.pop('a') }}", {"d": {"a": 1}}),
    ("{{ l.append is defined }}|{{ l.append }}|", {"l": [1]}),
    ("{{ ''.__class__ }}", {}),
    # --- globals
    ("{{ raise_exception('boom') }}", {}),
    ("{{ dict(a=1, b='x') }} {{ dict({'k': 1}, j=2) }} {{ namespace(a=1).a }}", {}),
    ("{{ range(100001) | length }}", {}),
    ("{{ strftime_now('%Y-%m-%d %d %b %Y %B %A %H:%M') }}", {}),
    ("{% set j = joiner(', ') %}{% for x in [1, 2, 3] %}{{ j() }}{{ x }}{% endfor %}", {}),
    # --- undefined semantics
    ("[{{ nothing }}]{{ nothing | length }}{% if nothing %}t{% else %}f{% endif %}{% for x in nothing %}x{% endfor %}{{ nothing is defined }}{{ nothing == nothing }}{{ nothing ~ 'x' }}", {}),
    ("{{ nothing + 1 }}", {}),
    ("{{ nothing.attr }}", {}),
    ("{{ nothing() }}", {}),
    ("{{ 'x' in nothing }}{{ nothing | list }}{{ nothing | upper }}{{ nothing | trim }}|", {}),
    ("{{ nothing < 1 }}", {}),
    ("{{ nothing | int }}", {}),
    # --- syntax errors (must raise, not crash)
    ("{% if x %}never closed", {}),
    ("{% for x in y %}{% endif %}", {}),
    ("{{ unclosed", {}),
    ("{% endfor %}", {}),
    ("{% bogus %}", {}),
    ("{{ 1 + }}", {}),
    ("{{ (1, 2 }}", {}),
    ("{% break %}", {}),
    ("{# never closed", {}),
    ("{{ 'abc }}", {}),
    ("{% macro m(a=1, b) %}{% endmacro %}", {}),
    ("{{ x is nosuchtest }}", {}),
    ("{% set 1 = 2 %}", {}),
    ("{{ a is defined is defined }}", {}),
]


def render_case(template, context):
    env = chat_reference.make_environment()
    try:
        return {"expected": env.from_string(template).render(**context)}
    except Exception as e:  # noqa: BLE001
        return {"error": True, "python_error": f"{type(e).__name__}: {e}"}


def build():
    os.environ["KILN_DATE_OVERRIDE"] = "2024-07-26 09:30:00"
    out = []
    for template, context in CASES:
        case = {"template": template, "context": context}
        case.update(render_case(template, context))
        out.append(case)
    return out


def main():
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true")
    g.add_argument("--check", action="store_true")
    a = ap.parse_args()
    text = json.dumps({"date_override": "2024-07-26 09:30:00", "cases": build()}, ensure_ascii=False, indent=1) + "\n"
    if a.write:
        FIXTURE.write_text(text, encoding="utf-8")
        print(f"wrote {FIXTURE} ({len(CASES)} cases)")
        return 0
    if FIXTURE.read_text(encoding="utf-8") != text:
        print(f"{FIXTURE} is stale: run tools/chat_snippets.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
