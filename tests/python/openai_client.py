"""Drives a troupe server with the official `openai` package, as a user's code would.

Usage: openai_client.py BASE_URL API_KEY MODEL — prints one JSON object with what it saw.
"""
import json
import sys

import openai
from openai import OpenAI

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
seen = {}

whole = client.completions.create(model=model, prompt="ROMEO.", max_tokens=12, temperature=0, seed=1)
seen["text"] = whole.choices[0].text
seen["finish_reason"] = whole.choices[0].finish_reason
seen["model"] = whole.model
seen["fingerprint"] = whole.system_fingerprint
seen["completion_tokens"] = whole.usage.completion_tokens

pieces, finish, usage = [], None, None
stream = client.completions.create(
    model=model, prompt="ROMEO.", max_tokens=12, temperature=0, seed=1, stream=True, stream_options={"include_usage": True}
)
for chunk in stream:
    for choice in chunk.choices:
        pieces.append(choice.text)
        finish = choice.finish_reason or finish
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
seen["stream_text"] = "".join(pieces)
seen["stream_chunks"] = len(pieces)
seen["stream_finish_reason"] = finish
seen["stream_usage"] = usage

seen["models"] = [m.id for m in client.models.list().data]

messages = [{"role": "user", "content": "Hi"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0, seed=1)
seen["chat_role"] = chat.choices[0].message.role
seen["chat_text"] = chat.choices[0].message.content
seen["chat_object"] = chat.object
seen["chat_tokens"] = chat.usage.completion_tokens
pieces = []
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0, seed=1, stream=True):
    for choice in chunk.choices:
        pieces.append(choice.delta.content or "")
seen["chat_stream_text"] = "".join(pieces)

# Scoring a text as evaluation tools do: echo, no new tokens, log-probabilities.
scored = client.completions.create(model=model, prompt="ROMEO. What", max_tokens=0, echo=True, logprobs=1)
lp = scored.choices[0].logprobs
seen["echo_text"] = scored.choices[0].text
seen["echo_tokens"] = lp.tokens
seen["echo_token_logprobs"] = lp.token_logprobs
seen["echo_top"] = [None if t is None else len(t) for t in lp.top_logprobs]
seen["echo_offsets"] = lp.text_offset
# Generation with log-probabilities and several completions.
several = client.completions.create(model=model, prompt="ROMEO.", max_tokens=5, temperature=1.0, seed=3, n=3, logprobs=2)
seen["n_indices"] = [c.index for c in several.choices]
seen["n_texts"] = [c.text for c in several.choices]
seen["n_logprob_counts"] = [len(c.logprobs.token_logprobs) for c in several.choices]
seen["n_completion_tokens"] = several.usage.completion_tokens

try:
    OpenAI(base_url=base + "/v1", api_key="wrong-key", max_retries=0).completions.create(model=model, prompt="x", max_tokens=1)
    seen["wrong_key"] = "accepted"
except openai.AuthenticationError as e:
    seen["wrong_key"] = "refused: %s" % e.message
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    seen["unknown_model"] = "accepted"
except openai.NotFoundError as e:
    seen["unknown_model"] = "refused: %s" % e.message
try:
    client.completions.create(model=model, prompt="x", max_tokens=100000)
    seen["too_many_tokens"] = "accepted"
except openai.BadRequestError as e:
    seen["too_many_tokens"] = "refused: %s" % e.message

print(json.dumps(seen))
