"""What a model does with a weather tool: how often it writes a well-formed call naming the asked-for city,
left to itself (``tool_choice: "auto"``) and forced by the grammar (``"required"``).

    python benchmarks/tool_call_probe.py --model DIR [--out bench-results/tool_calls.json]

Four questions, each greedy and at temperature 0.7 with seeds 1 and 2 ("auto") or seed 1 ("required").
For the default model, DIR is its cache directory (``a8w8-serve serve`` prints it). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import WEATHER_TOOL as TOOL  # noqa: E402
from servers import CliServer  # noqa: E402

CITIES = {
    "What is the weather in Paris?": "Paris",
    "What's the weather like in London today?": "London",
    "Is it raining in Tokyo?": "Tokyo",
    "Tell me the weather in Berlin.": "Berlin",
}
SAMPLINGS = {"auto": [(0.0, None), (0.7, 1), (0.7, 2)], "required": [(0.0, None), (0.7, 1)]}


def _city(arguments: str) -> str | None:
    try:
        return json.loads(arguments).get("city")
    except (json.JSONDecodeError, AttributeError):
        return None  # an incomplete or non-object call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="bench-results/tool_calls.json")
    args = ap.parse_args()
    server = CliServer(Path(args.model), "--served-model-name", "m", "--max-model-len", "2048")
    results: dict[str, dict] = {}
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0, timeout=300)
        for choice, samplings in SAMPLINGS.items():
            answers = []
            for question, city in CITIES.items():
                for temperature, seed in samplings:
                    r = client.chat.completions.create(
                        model="m",
                        messages=[{"role": "user", "content": question}],
                        tools=[TOOL],
                        tool_choice=choice,
                        parallel_tool_calls=False,
                        max_tokens=80,
                        temperature=temperature,
                        seed=seed,
                    )
                    m = r.choices[0].message
                    calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or []]
                    right = any(name == "get_weather" and _city(a) == city for name, a in calls)
                    answers.append({"question": question, "calls": calls, "content": m.content, "right_city": right})
            results[choice] = {
                "answers": len(answers),
                "with_a_call": sum(bool(a["calls"]) for a in answers),
                "call_names_the_city": sum(a["right_city"] for a in answers),
                "detail": answers,
            }
            print(choice, {k: v for k, v in results[choice].items() if k != "detail"})
    finally:
        server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
