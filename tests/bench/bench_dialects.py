"""Streaming overhead of each dialect, against Chat Completions, for the same completion.

The default model decodes greedily (temperature 0), so every dialect streams exactly the same
tokens for the same conversation; only the translation layer differs. Runs are interleaved
(chat, messages, responses, gemini, chat, ...) so drift in machine load hits all four alike, and the
shared prompt is cached once up front so every run pays the same (cached) prefill.

    python tests/bench/bench_dialects.py [--quick]
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

PROMPT = "Write a short story about a robot who learns to paint."


def _bodies(tokens: int) -> dict[str, tuple[str, dict]]:
    messages = [{"role": "user", "content": PROMPT}]
    return {
        "chat": ("/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": tokens,
                                          "temperature": 0, "stream": True}),
        "messages": ("/v1/messages", {"model": "tiny", "messages": messages, "max_tokens": tokens,
                                      "temperature": 0, "stream": True}),
        "responses": ("/v1/responses", {"model": "tiny", "input": PROMPT, "max_output_tokens": tokens,
                                        "temperature": 0, "stream": True, "store": False}),
        "gemini": ("/v1beta/models/tiny:streamGenerateContent?alt=sse", {
            "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
            "generationConfig": {"maxOutputTokens": tokens, "temperature": 0}}),
    }


def _stream_seconds(url: str, path: str, body: dict) -> tuple[float, int]:
    started = time.perf_counter()
    events = 0
    with httpx.stream("POST", url + path, json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            events += line.startswith("data: ")
    return time.perf_counter() - started, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few tokens and repetitions (checks the script)")
    args = parser.parse_args()
    tokens, reps = (16, 2) if args.quick else (128, 5)
    print(f"loading {DEFAULT_MODEL} ...", file=sys.stderr)
    server, live = start_gateway(resolve_model(DEFAULT_MODEL), Path(tempfile.mkdtemp()))
    bodies = _bodies(tokens)
    times: dict[str, list[float]] = {name: [] for name in bodies}
    with server as url:
        _stream_seconds(url, *bodies["chat"])  # warm-up: caches the shared prompt
        for rep in range(reps):
            for name, (path, body) in bodies.items():
                seconds, _ = _stream_seconds(url, path, body)
                times[name].append(seconds)
            print(f"rep {rep + 1}/{reps} done", file=sys.stderr)
    lengths = {c.dialect: c.completion_len for s in live.store.sessions() for c in live.store.calls(s["id"])}
    base = statistics.median(times["chat"])
    print(f"\n### Streaming time per dialect ({DEFAULT_MODEL}, greedy, {tokens} max tokens, median of {reps})\n")
    print("| dialect | completion tokens | median s | vs Chat Completions |")
    print("|---|---|---|---|")
    results = {}
    for name, key in (("chat", "openai_chat"), ("messages", "anthropic_messages"), ("responses", "openai_responses"),
                      ("gemini", "gemini")):
        median = statistics.median(times[name])
        results[name] = {"median_s": median, "ratio": median / base, "completion_tokens": lengths.get(key)}
        print(f"| {name} | {lengths.get(key)} | {median:.3f} | {median / base:.3f}x |")
    out = Path(__file__).parent / "results" / ("dialects.quick.json" if args.quick else "dialects.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"tokens": tokens, "reps": reps, "times": times, "results": results}, indent=2))
    live.store.close()


if __name__ == "__main__":
    main()
