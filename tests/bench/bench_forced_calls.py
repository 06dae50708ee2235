"""What constraining a forced tool call costs, per generated token, against free sampling.

``tool_choice: "required"`` makes the embedded engine check every candidate token against the
call's grammar (a declared name, a JSON object of arguments, the closing tag) until the call is
complete. The baseline is the same request, same tools and prompt, with ``tool_choice: "none"``
(free sampling). Both decode greedily on the default model; runs are interleaved so drift in
machine load hits both alike; the figure is seconds per completion token, median of the runs.

    python tests/bench/bench_forced_calls.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arborl.gateway.engines.model_source import DEFAULT_MODEL, resolve_model
from conftest import start_gateway

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "run_command", "description": "Run a shell command",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}},
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris today?"}]


def _run(url: str, tool_choice: str, tokens: int) -> tuple[float, int, dict]:
    body = {"model": "any", "messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice,
            "max_tokens": tokens, "temperature": 0}
    started = time.perf_counter()
    reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    seconds = time.perf_counter() - started
    reply.raise_for_status()
    data = reply.json()
    return seconds, data["usage"]["completion_tokens"], data["choices"][0]["message"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few tokens and repetitions (checks the script)")
    args = parser.parse_args()
    tokens, reps = (16, 2) if args.quick else (64, 5)
    print(f"loading {DEFAULT_MODEL} ...", file=sys.stderr)
    server, live = start_gateway(resolve_model(DEFAULT_MODEL), Path(tempfile.mkdtemp()), any_model_name=True)
    per_token: dict[str, list[float]] = {"none": [], "required": []}
    seconds: dict[str, list[float]] = {"none": [], "required": []}
    calls = []
    with server as url:
        _run(url, "none", 4)  # warm up: the shared prompt's prefill is cached for every run after
        for rep in range(reps):
            for choice in ("none", "required"):
                took, completion, message = _run(url, choice, tokens)
                seconds[choice].append(took)
                per_token[choice].append(took / max(completion, 1))
                if choice == "required":
                    calls.append(message.get("tool_calls"))
                print(f"run {rep + 1}/{reps} {choice}: {completion} tokens in {took:.2f} s", file=sys.stderr)
    live.store.close()
    def parses(call: dict) -> bool:
        return isinstance(json.loads(call["function"]["arguments"]), dict)

    well_formed = sum(bool(c) and all(parses(t) for t in c) for c in calls)
    free, forced = (statistics.median(per_token[c]) for c in ("none", "required"))
    print("\n| tool_choice | median request | median per completion token | vs free sampling |")
    print("| --- | --- | --- | --- |")
    print(f"| none (free sampling) | {statistics.median(seconds['none']):.2f} s | {1000 * free:.1f} ms | 1.00x |")
    print(f"| required (constrained) | {statistics.median(seconds['required']):.2f} s | {1000 * forced:.1f} ms"
          f" | **{forced / free:.2f}x** |")
    print(f"\nforced calls that named a declared tool with JSON arguments: {well_formed} of {len(calls)}")
    out = Path(__file__).parent / "results" / "forced_calls.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"tokens": tokens, "reps": reps, "seconds": seconds, "per_token": per_token,
                               "well_formed": well_formed, "calls": len(calls)}, indent=2))


if __name__ == "__main__":
    main()
