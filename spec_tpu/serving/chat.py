"""Chat messages -> one prompt string.

A converted checkpoint carries its tokenizer files in `<checkpoint>/tokenizer/`
(checkpoints/hf.py); the chat template comes from `chat_template.jinja` there or the
`chat_template` field of `tokenizer_config.json`, rendered with jinja2 the way transformers'
apply_chat_template does (trim_blocks, lstrip_blocks, raise_exception, add_generation_prompt).
A checkpoint without one (the embedded pair: a Python-code model, not a chat model) gets the
plain fallback: the messages' contents one after another, each on its own line, so the
conversation reads as one document that the model continues.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

ROLES = ("system", "user", "assistant", "tool", "developer")
# Where an image content part was, in rendered text (a private-use character, removed from
# messages' own text): the server turns each into the model's start_of_image token.
IMAGE_MARK = "\ue000"


class ChatTemplateError(ValueError):
  pass


def message_text(content, images: list | None = None) -> str:
  """A message's text: a string, or OpenAI content parts of type 'text', and of type
  'image_url' where `images` is a list (each part's URL is appended to it and IMAGE_MARK stands
  in the text where it was; without a list they are refused)."""
  if isinstance(content, str):
    return content.replace(IMAGE_MARK, "")
  if isinstance(content, list):
    parts = []
    for part in content:
      kind = part.get("type") if isinstance(part, dict) else None
      if kind == "text" and isinstance(part.get("text"), str):
        parts.append(part["text"].replace(IMAGE_MARK, ""))
      elif kind == "image_url":
        if images is None:
          raise ChatTemplateError("this model does not read images (image_url content parts)")
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        images.append(url)
        parts.append(IMAGE_MARK)
      else:
        raise ChatTemplateError("content parts must be of type 'text' or 'image_url'")
    return "".join(parts)
  raise ChatTemplateError("message content must be a string or a list of content parts")


class ChatTemplate:
  """Renders messages to a prompt; `bos` is True when the rendered text began with the
  tokenizer's BOS string (stripped: the engine adds the BOS id instead, since a tokenizer
  encodes the literal text '<bos>' as characters)."""

  def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = ""):
    self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
    self._template = None
    if source is not None:
      try:
        import jinja2
        from jinja2 import sandbox
      except ImportError as e:
        raise ChatTemplateError("the checkpoint's chat template needs jinja2") from e

      def raise_exception(message):
        raise ChatTemplateError(message)

      env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                  extensions=["jinja2.ext.loopcontrols"])
      env.globals["raise_exception"] = raise_exception
      env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent,
                                                                       ensure_ascii=False)
      try:
        self._template = env.from_string(source)
      except jinja2.TemplateError as e:
        raise ChatTemplateError(f"bad chat template: {e}") from e

  @property
  def is_fallback(self) -> bool:
    return self._template is None

  def render(self, messages: Sequence[dict], images: list | None = None) -> tuple[str, bool]:
    """(prompt text, starts with BOS) for OpenAI-style messages; images: see message_text."""
    plain = []
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ChatTemplateError(f"messages[{i}] needs a role among {', '.join(ROLES)}")
      plain.append({"role": m["role"], "content": message_text(m.get("content", ""), images)})
    if not plain:
      raise ChatTemplateError("messages is empty")
    if self._template is None:
      return "\n".join(m["content"] for m in plain) + "\n", False
    try:
      text = self._template.render(messages=plain, add_generation_prompt=True,
                                   bos_token=self.bos_token, eos_token=self.eos_token)
    except ChatTemplateError:
      raise
    except Exception as e:  # a template's own error (jinja2 or what it calls)
      raise ChatTemplateError(f"chat template failed: {e}") from e
    if self.bos_token and text.startswith(self.bos_token):
      return text[len(self.bos_token):], True
    return text, False


def _token_text(value) -> str:
  if isinstance(value, dict):
    value = value.get("content", "")
  return value if isinstance(value, str) else ""


def load(checkpoint_dir: str | None) -> ChatTemplate:
  """The checkpoint's chat template, or the plain fallback."""
  if not checkpoint_dir:
    return ChatTemplate()
  tok_dir = os.path.join(checkpoint_dir, "tokenizer")
  config = {}
  config_path = os.path.join(tok_dir, "tokenizer_config.json")
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  source = None
  jinja_path = os.path.join(tok_dir, "chat_template.jinja")
  if os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      source = f.read()
  elif isinstance(config.get("chat_template"), str):
    source = config["chat_template"]
  elif isinstance(config.get("chat_template"), list):  # named templates: take "default"
    named = {t.get("name"): t.get("template") for t in config["chat_template"]}
    source = named.get("default")
  if source is None:
    return ChatTemplate()
  return ChatTemplate(source, bos_token=_token_text(config.get("bos_token")),
                      eos_token=_token_text(config.get("eos_token")))
