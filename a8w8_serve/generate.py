"""``a8w8-serve generate``: offline generation, no server."""

from __future__ import annotations

import argparse
import logging

from a8w8_serve.flags import HelpFormatter, add_model_args, engine_config

log = logging.getLogger("a8w8.cli")


def run(args: argparse.Namespace) -> None:
    import time

    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    config = engine_config(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sample_seed,
        ignore_eos=args.ignore_eos,
    )
    worker = config.worker
    log.info(
        "loading %s (quantization %s, KV cache %s): starting the worker, reading and packing the weights",
        worker.model_dir,
        worker.quantization,
        worker.kv_cache_dtype,
    )
    started = time.monotonic()
    with LLM(
        worker.model_dir,
        worker=worker,
        scheduler=config.scheduler,
        tokenizer_impl=config.tokenizer_impl,
        chat_template=config.chat_template,
    ) as llm:
        template = llm.core.chat_template
        if args.raw:
            prompts: list = list(args.prompt)
        elif template is None:
            log.warning("the model has no chat template: the prompts go to it as plain text (as with --raw)")
            prompts = list(args.prompt)
        else:  # each prompt as a user message, as /v1/chat/completions sends it
            prompts = [llm.tokenizer.encode(template.render([{"role": "user", "content": p}])) for p in args.prompt]
        log.info(
            "loaded in %.1f s; generating %d completion(s) of up to %d tokens%s",
            time.monotonic() - started,
            len(prompts),
            args.max_tokens,
            "" if args.raw or template is None else " (prompts in the chat template; --raw for plain text)",
        )
        for text, res in zip(args.prompt, llm.generate(prompts, params)):
            for out in res.outputs:
                print(
                    f"--- prompt: {text!r} ({len(res.prompt_token_ids)} tokens), "
                    f"{len(out.token_ids)} tokens, finish_reason={out.finish_reason}"
                )
                print(out.text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="offline generation, no server", formatter_class=HelpFormatter)
    add_model_args(gen)
    p = gen.add_argument_group("prompts and sampling")
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="a user message, rendered in the model's chat template (repeatable: run as one batch)",
    )
    p.add_argument("--raw", action="store_true", help="send each --prompt as plain text, without the chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per completion")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--sample-seed", type=int, default=None, help="seed of this run's sampling (default: --seed's)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    gen.set_defaults(func=run)
