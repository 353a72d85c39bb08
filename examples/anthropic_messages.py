from anthropic import Anthropic

client = Anthropic(base_url="http://127.0.0.1:8000", api_key="none")
with client.messages.stream(
    model="smollm2-135m-instruct",
    max_tokens=64,
    system="Answer in one sentence.",
    messages=[{"role": "user", "content": "Which city is the capital of France?"}],
) as stream:
    for text in stream.text_stream:
        print(text, end="", flush=True)
print()
