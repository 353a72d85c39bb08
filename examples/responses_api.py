from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
first = client.responses.create(
    model="smollm2-135m-instruct",
    instructions="Answer in one sentence.",
    input="Which city is the capital of France?",
    max_output_tokens=32,
    temperature=0,
)
print(first.output_text)
# the conversation goes on from the stored response
second = client.responses.create(
    model="smollm2-135m-instruct",
    previous_response_id=first.id,
    input="And of Italy?",
    max_output_tokens=32,
    temperature=0,
)
print(second.output_text)
