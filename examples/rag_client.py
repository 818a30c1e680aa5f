"""A RAG client for kvgate: retrieved passages as separate messages, so each is a chunk that
kvgate reuses wherever it appears, and the per-request cache controls.

    python examples/rag_client.py [BASE_URL]

Needs the `openai` package (`make test` installs it in ~/.cache/kvgate/venv).
"""
import sys
import time

import openai

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
model = client.models.list().data[0].id

passages = [
    "Cargo is Rust's build system and package manager. It downloads dependencies, compiles "
    "packages, makes distributable packages and uploads them to crates.io.",
    "Ownership is a set of rules that govern how a Rust program manages memory. Each value has "
    "an owner, there can be only one owner at a time, and the value is dropped with its owner.",
    "A trait defines functionality a particular type has and can share with other types. Trait "
    "bounds specify that a generic type can be any type that has certain behaviour.",
]


def ask(order, question, cache="compose", budget=None):
    messages = [{"role": "system", "content": "Answer using only the passages."}]
    messages += [{"role": "user", "content": passages[i]} for i in order]
    messages.append({"role": "user", "content": question})
    headers = {"x-kvgate-cache": cache}
    if budget is not None:
        headers["x-kvgate-recompute-budget"] = str(budget)
    start = time.time()
    r = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, temperature=0, max_tokens=48, extra_headers=headers)
    reply = r.parse()
    kv = r.http_response.json()["kvgate"]
    print(f"[{cache:7}] {1e3 * (time.time() - start):6.0f} ms  hit {kv['chunks_hit']}/{kv['chunks_total']} chunks, "
          f"{kv['reused_tokens']} reused, {kv['recomputed_tokens']} recomputed: {reply.choices[0].message.content!r}")


ask([0, 1, 2], "What does Cargo do?")               # first time: every chunk computed and cached
ask([2, 0, 1], "What is ownership?")                # new order, new question: passages reused
ask([2, 0, 1], "What is ownership?", cache="off")   # the same prompt, fully recomputed
ask([2, 0, 1], "What is ownership?", budget=0.3)    # recompute more of the reused tokens
