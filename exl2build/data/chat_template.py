"""Chat templates rendered as transformers renders them (`apply_chat_template`).

A sandboxed jinja2 environment with what model templates rely on beyond plain jinja2:
`{% break %}` / `{% continue %}`, `{% generation %}` blocks (transformers marks the assistant's
tokens with them; here they render their body), a `tojson` that keeps non-ASCII text and `<`
as they are, and the globals `raise_exception` and `strftime_now`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from exl2build.errors import InputError


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser) -> list[nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render(template: str, messages: list[dict], source: str, **variables) -> str:
    """The template's text for `messages`; `variables` are the other names it may read
    (add_generation_prompt, bos_token, eos_token). Errors name `source`, the template's file."""
    from jinja2 import TemplateError

    class Refused(Exception):
        pass

    def raise_exception(msg):
        raise Refused(msg)

    try:
        compiled = _environment().from_string(template)
        return compiled.render(messages=messages, raise_exception=raise_exception, **variables)
    except Refused as e:
        raise InputError(f"{source}: the chat template refused the conversation: {e}") from None
    except TemplateError as e:
        raise InputError(f"{source}: the chat template cannot be rendered ({type(e).__name__}: {e}). "
                         "Fix the template, or remove it to chat in a plain transcript.") from None
