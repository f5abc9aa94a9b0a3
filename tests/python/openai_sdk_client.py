"""The official OpenAI Python SDK as a client of the apikeyrouter proxy.

Run by the Rust test `python_sdk::official_openai_sdk_works_against_the_proxy`, which
starts the proxy and passes its base URL as the argument, and a client token of the
config file and one made through the management API in `SDK_CLIENT_TOKEN` and
`SDK_MADE_TOKEN` (not on the command line, which other processes can read). Every
check asserts on
values; the script exits non-zero on the first failure.
"""

import os
import sys

import openai
from openai import OpenAI


def main(base_url: str, token: str, made_token: str) -> None:
    client = OpenAI(base_url=base_url, api_key=token, max_retries=0)
    checks = 0

    completion = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Hello from the SDK"}],
    )
    assert completion.object == "chat.completion", completion
    assert completion.choices[0].message.role == "assistant"
    assert "Hello from the SDK" in completion.choices[0].message.content, completion
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    checks += 1

    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "headers please"}]
    )
    assert raw.headers["x-apikeyrouter-provider"] == "openai"
    assert raw.headers["x-apikeyrouter-key-id"].startswith("openai-")
    assert float(raw.headers["x-apikeyrouter-cost-usd"]) > 0
    checks += 1

    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Stream this"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text.startswith("Simulated reply from gpt-4o"), text
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0
    checks += 1

    # The SDK asks for base64 by default and decodes it.
    embeddings = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"], dimensions=8)
    assert len(embeddings.data) == 2
    assert len(embeddings.data[0].embedding) == 8
    assert abs(sum(x * x for x in embeddings.data[0].embedding) - 1.0) < 1e-4
    floats = client.embeddings.create(model="text-embedding-3-small", input="gamma", encoding_format="float")
    assert len(floats.data[0].embedding) == 8
    checks += 1

    models = [m.id for m in client.models.list()]
    assert "gpt-4o" in models and "text-embedding-3-small" in models, models
    checks += 1

    model = client.models.retrieve("gpt-4o")
    assert (model.id, model.object, model.owned_by) == ("gpt-4o", "model", "openai"), model
    try:
        client.models.retrieve("no-such-model")
        raise AssertionError("expected a 404")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
    checks += 1

    # Sampling options the SDK sends are accepted; log probabilities are refused by name.
    seeded = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "seeded"}],
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="end-user-1",
    )
    assert seeded.choices[0].finish_reason == "stop", seeded
    try:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], logprobs=True
        )
        raise AssertionError("expected a 400")
    except openai.BadRequestError as e:
        assert e.body["param"] == "logprobs", e.body
    checks += 1

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("expected a 404")
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert e.body["code"] == "model_not_found", e.body
    checks += 1

    try:
        OpenAI(base_url=base_url, api_key="wrong-token", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
        raise AssertionError("expected a 401")
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    checks += 1

    try:
        client.chat.completions.create(model="gpt-4o", messages=[])
        raise AssertionError("expected a 400")
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.body["param"] == "messages", e.body
    checks += 1

    # A virtual key made through the management API (models gpt-4o, rpm 1): its
    # limits reach the SDK as its own exceptions.
    made = OpenAI(base_url=base_url, api_key=made_token, max_retries=0)
    assert made.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "made"}]
    ).choices[0].finish_reason == "stop"
    try:
        made.embeddings.create(model="text-embedding-3-small", input="x")
        raise AssertionError("expected a 403")
    except openai.PermissionDeniedError as e:
        assert e.status_code == 403, e
    try:
        made.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "again"}])
        raise AssertionError("expected a 429")
    except openai.RateLimitError as e:
        assert e.body["code"] == "rate_limit_exceeded", e.body
        assert int(e.response.headers["retry-after"]) >= 1
    checks += 1

    print(f"openai sdk {openai.__version__}: {checks} passed, 0 failed")


if __name__ == "__main__":
    main(sys.argv[1], os.environ["SDK_CLIENT_TOKEN"], os.environ["SDK_MADE_TOKEN"])
