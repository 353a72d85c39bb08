"""Speculative decoding by prompt lookup, side by side: the same model served with and without
``--speculative-config``, the same chat requests (greedy) sent to both in interleaved rounds; output tokens/s
at concurrency 1 and 16 on input-grounded work (rewrite a given function with one change, extract fields from a
given text, summarize with quotes: the answer repeats the input, which lookup drafts from) and on free chat
(where it rarely helps); each set's ratio, the draft acceptance from /metrics, and whether both servers gave
the same answers (greedy decoding must not change with speculation).

    python benchmarks/spec_bench.py [--model DIR] [--k 4] [--lookup-max 3] [--rounds 2] [--out bench-results/spec.json]

Without ``--model`` it serves the default model. Everything runs on 127.0.0.1; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from servers import CliServer  # noqa: E402

CODE = '''def compute_total(prices, tax_rate):
    """Add up the prices and the tax on them."""
    subtotal = 0
    for price in prices:
        if price < 0:
            raise ValueError("a price cannot be negative")
        subtotal += price
    tax = subtotal * tax_rate
    total = subtotal + tax
    return round(total, 2)


def describe_order(order):
    lines = []
    for item in order["items"]:
        lines.append(f"{item['name']}: {item['price']:.2f}")
    lines.append(f"total: {compute_total([i['price'] for i in order['items']], order['tax']):.2f}")
    return "\\n".join(lines)
'''
LETTER = (
    "Dear support team, my name is Clara Jensen and I live in Aarhus. On 14 March I ordered a blue kettle "
    "and two mugs, order number 88213, and paid 64 euros. The kettle arrived with a cracked lid, and the "
    "mugs have not arrived at all. I would like a new lid or a refund for the kettle, and I would like to "
    "know when the mugs will be sent. You can reach me at the address on the order. Kind regards, Clara."
)
STORY = (
    "The lighthouse on Gull Point was built in 1871. For ninety years a keeper climbed its 112 steps every "
    "evening to light the lamp. In 1961 the lamp was replaced by an electric one, and the last keeper, Anna "
    "Holt, moved to the village. She said that she missed the sound of the sea at night more than anything. "
    "Today the lighthouse is a small museum, open from May to September, and visitors can still climb to the top."
)
GROUNDED = [
    f"Here is some Python code.\n\n{CODE}\nReturn the same code with the function compute_total renamed to sum_prices "
    "everywhere. Output only the code.",
    f'Here is some Python code.\n\n{CODE}\nRewrite this code so that the error message says "negative price" '
    "instead. Output the whole code.",
    f"Extract the customer's name, city, order number, order date and amount from this message, one per line, "
    f"then quote the sentence that describes the problem.\n\n{LETTER}",
    f"Copy the following message exactly, then add one line saying what the customer wants.\n\n{LETTER}",
    f"Summarize this text in three bullet points, each quoting one sentence of it exactly.\n\n{STORY}",
    f"Repeat this text word for word, then give it a title.\n\n{STORY}",
]
FREE_CHAT = [
    "Write a short poem about autumn leaves.",
    "What are three good habits for staying healthy?",
    "Explain why the sky is blue to a child.",
    "Give me an idea for a birthday party.",
    "What is the difference between a lake and a pond?",
    "Tell me a fun fact about octopuses.",
]
MAX_TOKENS = 200
CONCURRENCY = (1, 16)


async def run_set(base: str, prompts: list[str], concurrency: int) -> tuple[float, list[str], int]:
    """(output tokens/s over the whole set, the answers, output tokens): ``concurrency`` clients work through
    the prompts (repeated to keep every client busy at 16)."""
    work = prompts * max(1, concurrency // len(prompts) + (1 if concurrency > len(prompts) else 0))
    queue: asyncio.Queue = asyncio.Queue()
    for i, p in enumerate(work):
        queue.put_nowait((i, p))
    answers: dict[int, str] = {}
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            i, prompt = queue.get_nowait()
            r = await http.post(
                f"{base}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0},
            )
            r.raise_for_status()
            body = r.json()
            answers[i] = body["choices"][0]["message"]["content"]
            tokens += body["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    return tokens / seconds, [answers[i] for i in range(len(prompts))], tokens


def spec_metrics(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        name = line.split("{", 1)[0]
        if name in (
            "vllm:spec_decode_num_draft_tokens_total",
            "vllm:spec_decode_num_accepted_tokens_total",
            "vllm:generation_tokens_total",
        ):
            out[name.removeprefix("vllm:").removesuffix("_total")] = float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=3, help="prompt_lookup_max")
    ap.add_argument("--lookup-min", type=int, default=1, help="prompt_lookup_min")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench-results/spec.json")
    args = ap.parse_args()
    model = args.model
    if model is None:
        from offline.default_model import ensure_default_model

        model = str(ensure_default_model()[0])
    spec = json.dumps(
        {
            "method": "ngram",
            "num_speculative_tokens": args.k,
            "prompt_lookup_max": args.lookup_max,
            "prompt_lookup_min": args.lookup_min,
        }
    )
    common = ("--max-model-len", "2048", "--kv-cache-memory", "1GiB", "--log-level", "warning")
    servers = {
        "plain": CliServer(Path(model), *common),
        "spec": CliServer(Path(model), *common, "--speculative-config", spec),
    }
    results: dict = {"model": model, "speculative_config": json.loads(spec), "rounds": []}
    try:
        for rnd in range(args.rounds):
            row: dict = {}
            for set_name, prompts in (("grounded", GROUNDED), ("free_chat", FREE_CHAT)):
                for c in CONCURRENCY:
                    order = list(servers) if rnd % 2 == 0 else list(servers)[::-1]
                    measured = {}
                    for name in order:
                        before = spec_metrics(servers[name].base)
                        tps, answers, tokens = asyncio.run(run_set(servers[name].base, prompts, c))
                        after = spec_metrics(servers[name].base)
                        measured[name] = {
                            "tok_s": tps,
                            "answers": answers,
                            "tokens": tokens,
                            **{k: after.get(k, 0) - before.get(k, 0) for k in after},
                        }
                    s, p = measured["spec"], measured["plain"]
                    drafted = s.get("spec_decode_num_draft_tokens", 0)
                    row[f"{set_name}_c{c}"] = {
                        "plain_tok_s": p["tok_s"],
                        "spec_tok_s": s["tok_s"],
                        "ratio": s["tok_s"] / p["tok_s"],
                        "acceptance": s.get("spec_decode_num_accepted_tokens", 0) / drafted if drafted else 0.0,
                        "same_answers": s["answers"] == p["answers"],
                    }
            results["rounds"].append(row)
    finally:
        for s in servers.values():
            s.stop()
    print(
        f"prompt lookup {spec}; greedy chat, {MAX_TOKENS} max tokens; {args.rounds} interleaved rounds; "
        f"output tok/s spec vs plain"
    )
    summary = {}
    for key in results["rounds"][0]:
        rows = [r[key] for r in results["rounds"]]
        med = lambda f: statistics.median(r[f] for r in rows)  # noqa: E731
        summary[key] = {
            "ratio": med("ratio"),
            "plain_tok_s": med("plain_tok_s"),
            "spec_tok_s": med("spec_tok_s"),
            "acceptance": med("acceptance"),
            "same_answers": all(r["same_answers"] for r in rows),
        }
        print(
            f"{key:14s} plain {summary[key]['plain_tok_s']:7.1f} tok/s, spec {summary[key]['spec_tok_s']:7.1f} tok/s "
            f"-> {summary[key]['ratio']:.2f}x (rounds {', '.join(format(r['ratio'], '.2f') for r in rows)}); draft "
            f"acceptance {100 * summary[key]['acceptance']:.0f} %; same answers: {summary[key]['same_answers']}"
        )
    results["summary"] = summary
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
