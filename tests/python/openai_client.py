"""Drives a running kvgate with the official `openai` package, as a user's client would.

Usage: python openai_client.py BASE_URL MODEL
Exits non-zero (with the assertion) on the first behaviour that differs from OpenAI's.
"""
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

messages = [{"role": "user", "content": "What is 17 times 3?"}]
whole = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
text = whole.choices[0].message.content
# The words of a 135M model's greedy answer turn on near-ties: their shape is checked, and
# a clear-margin answer below ("Paris").
assert text.strip(), whole
assert whole.choices[0].finish_reason in ("stop", "length"), whole
assert whole.usage.prompt_tokens == 39 and whole.usage.completion_tokens > 0, whole.usage
assert whole.usage.prompt_tokens_details.cached_tokens == 0

stream = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=24, stream=True,
    stream_options={"include_usage": True},
)
parts, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        parts.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
assert "".join(parts) == text, ("".join(parts), text)
assert finish == whole.choices[0].finish_reason
assert usage is not None and usage.total_tokens == whole.usage.total_tokens, usage

comp = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=4, logprobs=2)
assert comp.choices[0].logprobs.tokens, comp
assert comp.choices[0].text.startswith(" Paris"), comp
streamed = "".join(c.choices[0].text for c in client.completions.create(
    model=model, prompt="The capital of France is", temperature=0, max_tokens=4, stream=True))
assert streamed == comp.choices[0].text, (streamed, comp.choices[0].text)

models = client.models.list()
assert [m.id for m in models.data] == [model], models

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404

try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=100000)
    raise AssertionError("context overflow accepted")
except openai.BadRequestError as e:
    assert "8192" in str(e), e

print("openai client: ok")
