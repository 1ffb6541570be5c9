"""llama.cpp itself reading a GGUF file: how it tokenizes prompts, its greedy tokens, its warnings.

Through ``xllamacpp`` (llama.cpp built as a prebuilt wheel, in the export extra; imported only
here, when a check runs): its ``Server`` loads the file as ``llama-server`` does, with LoRA adapters
where given, and listens on a free loopback port for this process alone (a random API key; the
port closes with the server). Its ``/tokenize`` gives the prompt's ids, its ``/completion`` the
greedy continuation (temperature 0, top-k 1) as token ids. xllamacpp's own calls answer in the
OpenAI format, which has no token ids, hence the HTTP routes.

llama.cpp writes its log from C++ to the process's standard error, where Python cannot catch it:
the file descriptor 2 is pointed at a temporary file while the server lives, and the log's
warning and error lines (``W`` / ``E``) are returned, so a caller can refuse a file llama.cpp
complains about ("missing pre-tokenizer type", a tensor of the wrong shape, ...). The server is
configured so that it has nothing of its own to warn about (API key set, no idle-slot cache).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import PeftkitError

PACKAGE = "xllamacpp"
MAX_CONTEXT = 512
"""Context the check's server is given (at most the model's own): prompts and continuations of a
check are far shorter, and a smaller context keeps the server's memory small."""
TIMEOUT = 600.0
# a log line: elapsed time, level letter, then the message ("0.00.640.441 W load: missing ...")
_LOG_LINE = re.compile(r"^\s*\d+(?:\.\d+)+\s+([A-Z])\s+(.*)$")


def available() -> bool:
    """Whether llama.cpp (the ``xllamacpp`` wheel) is installed."""
    return importlib.util.find_spec(PACKAGE) is not None


@dataclass
class LlamaCppRun:
    """What llama.cpp made of a GGUF file: each prompt's token ids and greedy continuation, and the
    warnings and errors it logged while it loaded and ran the file."""

    prompt_ids: list[list[int]]
    generated: list[list[int]]
    logprobs: list[list[float]]
    """Each generated token's log-probability (over the whole vocabulary, before sampling)."""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    version: str = ""


def run_llamacpp(
    model: str, prompts: list[str], new_tokens: int, context: int, lora: str | None = None, threads: int = 0
) -> LlamaCppRun:
    """Load the GGUF file ``model`` (with the LoRA GGUF ``lora`` applied at scale 1) in llama.cpp
    and give each of ``prompts``' token ids and ``new_tokens`` greedy tokens (fewer where llama.cpp
    stops at an end-of-generation token), with its warnings. ``context``: the model's own context
    length. ``threads``: 0 for up to 2 (the check's work is small). Raises ``PeftkitError`` where
    llama.cpp cannot load the file (with what it logged)."""
    import xllamacpp

    key = secrets.token_hex(16)
    clock = time.perf_counter()
    with _captured_stderr() as log:
        try:
            server = _start(xllamacpp, model, lora, min(context, MAX_CONTEXT), threads, key)
        except Exception as exc:  # noqa: BLE001 - xllamacpp raises RuntimeError; the log says why
            problems = _problems(_read(log)) or [str(exc)]
            raise PeftkitError(f"llama.cpp cannot load {os.path.basename(model)}: {problems[-1]}") from None
        failure = ""
        try:
            # special tokens added and parsed in the text, as transformers' tokenizer(prompt) does
            tokenize = [{"content": p, "add_special": True, "parse_special": True} for p in prompts]
            prompt_ids = [list(_post(server, key, "/tokenize", body)["tokens"]) for body in tokenize]
            greedy = [_greedy(server, key, ids, new_tokens) for ids in prompt_ids]
        except Exception as exc:  # noqa: BLE001 - kept as words: its traceback would keep the server alive
            failure = f"{type(exc).__name__}: {exc}"
        del server  # its destructor stops the loop and closes the port, its last lines logged here
        _settle(log)
        warnings = _problems(_read(log))
    if failure:
        raise PeftkitError(f"llama.cpp failed on {os.path.basename(model)}: {failure} ({'; '.join(warnings[-2:])})")
    version = getattr(xllamacpp, "__version__", "")
    generated, logprobs = [g[0] for g in greedy], [g[1] for g in greedy]
    return LlamaCppRun(prompt_ids, generated, logprobs, warnings, time.perf_counter() - clock, str(version))


def _start(xllamacpp: Any, model: str, lora: str | None, context: int, threads: int, key: str) -> Any:
    """A llama.cpp server on ``model`` (and ``lora``), on a free loopback port, answering ``key``."""
    params = xllamacpp.CommonParams()
    params.model.path = model
    if lora:
        params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(lora, 1.0)]
    params.n_ctx = context
    params.n_parallel = 1
    params.n_gpu_layers = 0  # the check compares with PyTorch's float32 on the CPU
    # float32 keys and values (llama.cpp's default is float16): what PyTorch's float32 computes
    params.cache_type_k = xllamacpp.ggml_type.GGML_TYPE_F32
    params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
    # no flash attention: its CPU kernel accumulates in float16, which moved SmolLM2-135M's
    # log-probabilities up to 3.5e-3 from PyTorch's (2.8e-4 without it)
    params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.warmup = False
    params.check_tensors = True  # llama.cpp checks every tensor's values as it loads them
    params.cache_ram_mib = 0
    params.cache_idle_slots = False  # else it warns that this needs a RAM cache
    params.api_keys = [key]  # else it warns that anyone may call it; and so no one else can
    params.hostnames = ["127.0.0.1"]
    params.port = 0
    count = threads or min(2, os.cpu_count() or 1)
    params.cpuparams.n_threads = count
    params.cpuparams_batch.n_threads = count
    handlers = _python_signal_handlers()
    try:
        return xllamacpp.Server(params)
    finally:
        _restore_signal_handlers(handlers)


def _python_signal_handlers() -> dict[int, Any]:
    """Python's handlers of SIGINT and SIGTERM. xllamacpp 2026.4's server start replaced them with
    llama-server's own (``sigaction`` in its ``init``); 2026.10's leaves them (measured), and a
    later one may do either."""
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    """Put Python's handlers back: llama-server's would call into a server gone after the check,
    and Ctrl-C must still raise KeyboardInterrupt. Only the main thread may set them."""
    for sig, handler in handlers.items():
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _post(server: Any, key: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` posted to the server's ``route``, its JSON answer."""
    request = urllib.request.Request(
        server.listening_address + route,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:  # noqa: S310 - our own loopback server
        result: dict[str, Any] = json.loads(answer.read())
    return result


def _greedy(server: Any, key: str, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """llama.cpp's greedy continuation of ``prompt_ids`` (temperature 0 and top-k 1: the most
    probable token at each step; no prompt cache): the token ids and their log-probabilities."""
    body = {
        "prompt": prompt_ids,
        "n_predict": new_tokens,
        "temperature": 0.0,
        "top_k": 1,
        "seed": 0,
        "cache_prompt": False,
        "return_tokens": True,
        "n_probs": 1,  # each token's log-probability, taken before sampling
    }
    answer = _post(server, key, "/completion", body)
    tokens = [int(t) for t in answer["tokens"]]
    # llama.cpp leaves the probabilities out where the tokens end inside a UTF-8 character (they
    # come with the text, which it holds back): then there is nothing to compare them with
    probabilities = [float(p["logprob"]) for p in answer.get("completion_probabilities") or []]
    return tokens, probabilities if len(probabilities) == len(tokens) else []


@contextlib.contextmanager
def _captured_stderr() -> Iterator[IO[bytes]]:
    """File descriptor 2 pointed at a temporary file (yielded) while the block runs: llama.cpp's
    log, written by C++, and anything else written there meanwhile."""
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _settle(log: IO[bytes], quiet: float = 0.15, limit: float = 2.0) -> None:
    """Wait until nothing more is written to ``log`` for ``quiet`` seconds (at most ``limit``):
    llama.cpp's logger writes from a thread of its own, a little after the event."""
    end, last, since = time.monotonic() + limit, -1, time.monotonic()
    while time.monotonic() < end:
        size = os.fstat(log.fileno()).st_size
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def _read(log: IO[bytes]) -> str:
    """Everything written to ``log`` so far."""
    log.seek(0)
    return log.read().decode("utf-8", errors="replace")


def _problems(text: str) -> list[str]:
    """The warning and error lines of llama.cpp's log ``text`` (level ``W`` or ``E``), each without
    its time and level; the blank and ``****`` lines of a framed warning left out."""
    found = []
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if not match or match.group(1) not in "WE":
            continue
        message = match.group(2).strip()
        body = message.split(":", 1)[-1].strip()
        if body.strip("* "):
            found.append(message)
    return found
