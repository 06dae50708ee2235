"""The gateway in front of vLLM: decode throughput and time to first token, arborl against vLLM direct.

One vLLM server (the CPU build from its own venv, tests/vllm_server.py) serves the default model
(SmolLM2-135M-Instruct, or ``--model``); ``arborl serve --engine vllm`` (its own process) stands
in front of it, recording every call. N concurrent streaming clients each ask for 64 tokens
(``ignore_eos``, so every answer has the same length), in rounds that alternate between the
targets so drift in the machine's load hits all alike:

  direct    ``/v1/completions`` on the vLLM server, with the prompt ids the gateway would send
  arborl    ``/v1/chat/completions`` on the gateway, each client its own session
  embedded  the same requests to a second gateway running the same model on its own embedded
            engine (the engines compared on the same prompts; ``--no-embedded`` skips it)

Throughput is completion tokens per second of wall time over a round; TTFT is from sending the
request to the first token's bytes. The goal is arborl within 1.05x of vLLM's own figures.

    python tests/bench/bench_vllm_engine.py [--concurrency 8 32] [--rounds 3]   # table to stdout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the vLLM test server

import vllm_server  # noqa: E402
from bench_proxy_overhead import Server, _free_port  # noqa: E402

TOKENS = 64
MESSAGES = [{"role": "system", "content": "You are a helpful coding assistant."},
            {"role": "user", "content": "Write a Python function that reverses a linked list, and explain it."}]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _one(client: httpx.AsyncClient, path: str, body: dict) -> tuple[float, int, float]:
    """(seconds to the first token, tokens, seconds to the end) of one streamed request."""
    started = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            choice = (json.loads(line[5:]).get("choices") or [{}])[0]
            # vLLM: the chunk's token ids; arborl: one logprobs entry per token, sent as it is sampled
            # (content text may be held back while it could still start a tool call)
            new = len(choice.get("token_ids") or ((choice.get("logprobs") or {}).get("content") or []))
            if new and first is None:
                first = time.perf_counter() - started
            tokens += new
    return first or float("nan"), tokens, time.perf_counter() - started


async def _round(url: str, path: str, bodies: list[dict]) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(_one(client, path, body) for body in bodies))
        wall = time.perf_counter() - started
    return {"ttft": [r[0] for r in results], "tokens": sum(r[1] for r in results), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="a model folder or the default's name")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="the server's --dtype (auto on a GPU)")
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded engine's rows")
    args = parser.parse_args()
    python = vllm_server.vllm_python()
    if python is None:
        raise SystemExit(f"vLLM is not installed (ARBORL_VLLM_PYTHON); install it with: {vllm_server.INSTALL}")
    from transformers import AutoTokenizer

    from arborl.gateway.engines.model_source import resolve_model
    from arborl.gateway.rendering import ChatRenderer
    from arborl.gateway.tool_parsers import get_parser
    from arborl.ops.engine_servers import VllmServer

    model = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="arborl-bench-vllm-"))
    vllm_port, gateway_port, embedded_port = _free_port(), _free_port(), _free_port()
    vllm_url, gateway_url = f"http://127.0.0.1:{vllm_port}", f"http://127.0.0.1:{gateway_port}"
    _log(f"starting vLLM on {model.name} (a minute or two: it compiles the model)")
    server = VllmServer(python, model, vllm_port, work / "vllm.log", max_num_seqs=max(args.concurrency),
                        dtype=args.dtype, max_model_len=2048)
    gateway = embedded = None
    try:
        server.start()
        gateway = Server("arborl", [sys.executable, "-m", "arborl.ops.cli", "serve", "--engine", "vllm",
                                    "--engine-url", vllm_url, "--model", str(model), "--served-name", model.name,
                                    "--run-dir", str(work / "run"), "--port", str(gateway_port)], gateway_port, work)
        gateway.ready("/readyz")
        if not args.no_embedded:  # the same model on arborl's own engine, same prompts
            embedded = Server("embedded", [sys.executable, "-m", "arborl.ops.cli", "serve", "--model", str(model),
                                           "--served-name", model.name, "--max-running", str(max(args.concurrency)),
                                           "--run-dir", str(work / "run-embedded"), "--port", str(embedded_port)],
                              embedded_port, work)
            embedded.ready("/readyz", timeout=600)
        embedded_url = f"http://127.0.0.1:{embedded_port}"
        # The ids the gateway sends for MESSAGES, rendered by its own renderer
        renderer = ChatRenderer(AutoTokenizer.from_pretrained(model), get_parser("hermes"))
        prompt_ids = renderer.encode(renderer.render(MESSAGES).text)
        # Every request repeats the prompt, so vLLM's prefix cache serves it after the first:
        # each stream is a new session, as at the start of a group of rollouts.
        sampling = {"max_tokens": TOKENS, "temperature": 1.0, "ignore_eos": True, "stream": True}
        table = []
        for n in args.concurrency:
            direct = [{"model": model.name, "prompt": prompt_ids, "return_token_ids": True, **sampling}
                      for _ in range(n)]
            through = [{"model": model.name, "messages": MESSAGES, "metadata": {"session_id": f"bench-{n}-{i}"},
                        "logprobs": True, **sampling} for i in range(n)]
            targets = [("vLLM direct", vllm_url, "/v1/completions", direct),
                       ("through arborl", gateway_url, "/v1/chat/completions", through)]
            if embedded is not None:
                targets.append(("embedded engine", embedded_url, "/v1/chat/completions", through))
            rows: dict[str, list[dict]] = {name: [] for name, *_ in targets}
            for r in range(args.rounds + 1):  # the first round of each warms up, uncounted
                for name, url, path, bodies in targets:
                    result = asyncio.run(_round(url, path, bodies))
                    if r:
                        rows[name].append(result)
                _log(f"  {n} streams: round {r}/{args.rounds} done")
            figures = {}
            for name, results in rows.items():
                figures[name] = {
                    "tok_s": statistics.median(x["tokens"] / x["wall"] for x in results),
                    "tokens": statistics.median(x["tokens"] for x in results),
                    "ttft_ms": 1000 * statistics.median(t for x in results for t in x["ttft"]),
                }
            table.append((n, figures))
    finally:
        for process in (gateway, embedded):
            if process is not None:
                process.stop()
        server.stop()
    build = "CPU build" if args.dtype == "float32" else args.dtype
    print(f"\n{model.name} on vLLM ({build}), {TOKENS} tokens per stream, median of {args.rounds} rounds")
    print("| streams | path | tokens per round | tokens/s | TTFT p50 ms | arborl / direct (goal: throughput >= 0.95x, "
          "TTFT <= 1.05x) |")
    print("|---|---|---|---|---|---|")
    for n, figures in table:
        direct, through = figures["vLLM direct"], figures["through arborl"]
        print(f"| {n} | vLLM direct | {direct['tokens']:.0f} | {direct['tok_s']:.1f} | {direct['ttft_ms']:.0f} | |")
        rate, ttft = through["tok_s"] / direct["tok_s"], through["ttft_ms"] / direct["ttft_ms"]
        print(f"| {n} | through arborl | {through['tokens']:.0f} | {through['tok_s']:.1f} | {through['ttft_ms']:.0f} | "
              f"throughput {rate:.3f}x, TTFT {ttft:.3f}x |")
        if "embedded engine" in figures:  # arborl's own engine, as the same gateway serves it
            own = figures["embedded engine"]
            print(f"| {n} | embedded engine (arborl) | {own['tokens']:.0f} | {own['tok_s']:.1f} | "
                  f"{own['ttft_ms']:.0f} | vs vLLM through arborl: throughput {own['tok_s'] / through['tok_s']:.3f}x, "
                  f"TTFT {own['ttft_ms'] / through['ttft_ms']:.3f}x |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "vllm_engine.json").write_text(json.dumps(
        [{"streams": n, **figures} for n, figures in table], indent=2))


if __name__ == "__main__":
    main()
