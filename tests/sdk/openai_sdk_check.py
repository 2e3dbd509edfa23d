#!/usr/bin/env python3
"""Checks Chorus's OpenAI-compatible API (/v1) with the official `openai` Python package.

Usage: openai_sdk_check.py <base_url ending in /v1> <api_key>

Lists the models, runs a non-streaming and a streaming chat completion (with
`stream_options={"include_usage": True}`) on `mock-echo`, checks the texts and the usage, checks
that errors surface as the SDK's typed exceptions, and prints a JSON summary on the last line of
stdout. Exit codes: 0 all checks passed, 1 a check failed, 2 bad arguments, 3 the `openai`
package is missing (install it with `python3 -m pip install openai`).

Run by the Rust test `openai_compat::the_official_openai_python_sdk_works_against_v1`.
"""

import json
import sys

NOT_INSTALLED_EXIT = 3


def fail(message):
    print(f"CHECK FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    base_url, api_key = sys.argv[1], sys.argv[2]
    try:
        import openai
    except ImportError as error:
        print(
            f"the Python `openai` package is not installed ({error}): "
            "run `python3 -m pip install openai` (.ci/run installs it)",
            file=sys.stderr,
        )
        sys.exit(NOT_INSTALLED_EXIT)

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)

    # Models.
    models = [model.id for model in client.models.list()]
    check("mock-echo" in models, f"mock-echo is not listed: {models}")
    check("mock-lorem" in models, f"mock-lorem is not listed: {models}")

    # A non-streaming completion.
    prompt = "hello from the python sdk"
    completion = client.chat.completions.create(
        model="mock-echo",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": prompt},
        ],
    )
    check(completion.object == "chat.completion", f"object: {completion.object}")
    check(completion.model == "mock-echo", f"model: {completion.model}")
    choice = completion.choices[0]
    check(choice.message.role == "assistant", f"role: {choice.message.role}")
    check(choice.message.content == prompt, f"content: {choice.message.content!r}")
    check(choice.finish_reason == "stop", f"finish_reason: {choice.finish_reason}")
    usage = completion.usage
    check(usage is not None, "no usage")
    check(usage.completion_tokens == 5, f"completion_tokens: {usage.completion_tokens}")
    check(usage.prompt_tokens == 7, f"prompt_tokens: {usage.prompt_tokens}")
    check(usage.total_tokens == 12, f"total_tokens: {usage.total_tokens}")

    # A streaming completion with usage in the last chunk.
    streamed_prompt = "streaming words come back"
    stream = client.chat.completions.create(
        model="mock-echo",
        messages=[{"role": "user", "content": streamed_prompt}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = []
    chunks = 0
    finish_reason = None
    stream_usage = None
    usage_chunk_was_last = False
    for chunk in stream:
        chunks += 1
        check(chunk.object == "chat.completion.chunk", f"chunk object: {chunk.object}")
        usage_chunk_was_last = False
        if chunk.usage is not None:
            stream_usage = chunk.usage
            usage_chunk_was_last = True
            check(chunk.choices == [], f"the usage chunk has no choices: {chunk.choices}")
        for streamed in chunk.choices:
            if streamed.delta.content:
                pieces.append(streamed.delta.content)
            if streamed.finish_reason:
                finish_reason = streamed.finish_reason
    streamed_text = "".join(pieces)
    check(streamed_text == streamed_prompt, f"streamed text: {streamed_text!r}")
    check(finish_reason == "stop", f"stream finish_reason: {finish_reason}")
    check(stream_usage is not None, "no usage chunk although include_usage was set")
    check(usage_chunk_was_last, "the usage chunk is not the last one")
    check(stream_usage.completion_tokens == 4, f"stream completion_tokens: {stream_usage}")
    check(stream_usage.prompt_tokens == 4, f"stream prompt_tokens: {stream_usage}")

    # Errors come back as the SDK's typed exceptions.
    errors = {}
    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
        fail("an unknown model was accepted")
    except openai.NotFoundError as error:
        errors["unknown_model"] = {"status": error.status_code, "type": type(error).__name__}
    bad_client = openai.OpenAI(
        base_url=base_url, api_key="ck-not-a-real-key", max_retries=0, timeout=30
    )
    try:
        bad_client.models.list()
        fail("a bad API key was accepted")
    except openai.AuthenticationError as error:
        errors["bad_key"] = {"status": error.status_code, "type": type(error).__name__}

    print(
        json.dumps(
            {
                "sdk_version": openai.__version__,
                "models": models,
                "completion": {
                    "text": choice.message.content,
                    "finish_reason": choice.finish_reason,
                    "usage": {
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "total_tokens": usage.total_tokens,
                    },
                },
                "stream": {
                    "text": streamed_text,
                    "chunks": chunks,
                    "finish_reason": finish_reason,
                    "usage": {
                        "prompt_tokens": stream_usage.prompt_tokens,
                        "completion_tokens": stream_usage.completion_tokens,
                        "total_tokens": stream_usage.total_tokens,
                    },
                },
                "errors": errors,
            }
        )
    )


if __name__ == "__main__":
    main()
