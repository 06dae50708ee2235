"""Serving benchmark: the embedded engine and the trajectory store, each against a baseline.

Run ``python tests/bench/bench_serving.py [--quick]``. Every figure is a ratio against a
baseline measured in the same run, on the default model (SmolLM2-135M-Instruct) on the CPU in
fp32 with torch using every core. Progress goes to stderr (one line per phase); the tables go
to stdout, and the same figures to ``tests/bench/results/serving.json`` (``serving.quick.json``
with ``--quick``, which uses tiny sizes only to check that the script works).

1. Batched decode throughput. 8 short chat prompts (each rendered with the chat template),
   submitted at once to ``EmbeddedEngine`` with ``asyncio.gather``, 128 sampled tokens each
   (``ignore_eos`` so every request generates exactly 128): completion tokens / wall time.
   Baseline: Hugging Face ``model.generate`` (same folder, "sdpa" attention, KV cache, sampling,
   exactly 128 new tokens) serving the same prompts one after another. Target: >= 3x.

2. Prefix-cache time to first token. A ~2,000-token multi-turn chat runs once with
   ``cache_key="s"`` (8 tokens) to fill the session cache; turn 2 is that prompt + its
   completion ids + a new ~30-token user turn, timed to its first ``SampledToken``.
   Baseline: the same turn-2 prompt with the prefix cache cleared (a full prefill). Three
   repetitions of each, alternating; medians. Target: >= 5x.

3. Recording cost. ``TrajectoryStore.record_call`` of calls with a prompt of 7,000 and a
   completion of 1,192 random token ids (with logprobs and versions), each the first call of
   a fresh session; and of 20-turn sessions whose every call extends the previous one by
   ~410 tokens (up to ~8k). Baseline: a plain SQLite insert of the same call as one row holding
   all its token ids in one blob (no trie), on a database with the same settings (WAL,
   ``synchronous=NORMAL``, one transaction per call). Target: p50 < 2 ms for the 8k calls.
   For the 20-turn sessions, also the stored tokens (trie) divided by the sum of every call's
   prompt + completion length.

The machine is small and may be shared: each table ends with the cores other processes kept
busy while the figure ran (from /proc/stat), and the script warns when that could skew it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from array import array
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Self

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from arborl.gateway.engines.base import Finished, SampledToken, SamplingParams
from arborl.gateway.engines.embedded import EmbeddedEngine
from arborl.gateway.engines.model_source import DEFAULT_MODEL, resolve_model
from arborl.rollout.records import CallRecord
from arborl.rollout.store import SqliteTrajectoryStore

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VOCAB = 49152  # the default model's vocabulary: the range of the random token ids of figure 3

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning to play the guitar.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet.",
    "How do I reverse a list in Python?",
    "What are the health benefits of drinking water?",
]

# Filler for the long session of figure 2: varied enough that the tokenizer does not merge it.
TOPICS = [
    "the history of the printing press",
    "how vaccines train the immune system",
    "the water cycle and cloud formation",
    "sorting algorithms and their complexity",
    "the causes of the French Revolution",
    "photosynthesis in desert plants",
    "how compilers turn source code into machine code",
    "the economics of renewable energy",
]


@dataclass(frozen=True)
class Sizes:
    requests: int
    decode_tokens: int
    session_tokens: int
    ttft_reps: int
    record_calls: int  # fresh-session calls of figure 3
    record_prompt: int
    record_completion: int
    growing_sessions: int
    growing_turns: int


FULL = Sizes(
    requests=8,
    decode_tokens=128,
    session_tokens=2000,
    ttft_reps=3,
    record_calls=200,
    record_prompt=7000,
    record_completion=1192,
    growing_sessions=10,
    growing_turns=20,
)
QUICK = Sizes(
    requests=2,
    decode_tokens=16,
    session_tokens=300,
    ttft_reps=1,
    record_calls=20,
    record_prompt=700,
    record_completion=124,
    growing_sessions=2,
    growing_turns=10,
)


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class OtherLoad:
    """How many cores other processes kept busy while a figure ran (None where /proc/stat is absent).

    The machine is small and may be shared: any other work skews every figure, so each records this.
    """

    cores: float | None = None
    seconds = 0.0

    def __enter__(self) -> Self:
        self._start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        (machine0, own0, wall0), (machine1, own1, wall1) = self._start, self._sample()
        self.seconds = wall1 - wall0
        if machine0 is not None and machine1 is not None:
            self.cores = max(0.0, (machine1 - machine0) - (own1 - own0)) / self.seconds

    @staticmethod
    def _sample() -> tuple[float | None, float, float]:
        try:
            ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
        except (OSError, ValueError, IndexError):
            machine = None
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return machine, usage.ru_utime + usage.ru_stime, time.perf_counter()


def measured(name: str, figure: dict, load: OtherLoad) -> None:
    """Attach the other processes' load to a figure, and warn when it was high enough to matter."""
    figure["other_processes_cpu_cores"] = load.cores
    figure["figure_seconds"] = load.seconds
    # CPU time comes in 10 ms ticks: over less than a couple of seconds the figure is only noise.
    if load.cores is not None and load.cores > 0.1 and load.seconds >= 2:
        progress(f"warning: other processes kept {load.cores:.2f} cores busy during {name}: it is skewed")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


# -- figure 1: batched decode throughput ------------------------------------------------------


async def engine_generate(engine: EmbeddedEngine, prompt: list[int], params: SamplingParams) -> int:
    produced = 0
    async for event in engine.generate(prompt, params):
        if isinstance(event, SampledToken):
            produced += 1
    return produced


async def engine_batch(engine: EmbeddedEngine, prompts: list[list[int]], tokens: int) -> tuple[int, float]:
    """Submit every prompt at once; (completion tokens, wall seconds)."""
    params = [
        SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    started = time.perf_counter()
    counts = await asyncio.gather(*map(partial(engine_generate, engine), prompts, params))
    return sum(counts), time.perf_counter() - started


def hf_sequential(model, prompts: list[list[int]], tokens: int) -> tuple[int, float]:
    """Hugging Face ``generate`` on each prompt in turn; (completion tokens, wall seconds)."""
    produced = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            torch.manual_seed(i)
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                use_cache=True,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                pad_token_id=model.generation_config.pad_token_id,
            )
            produced += out.shape[1] - len(prompt)
    return produced, time.perf_counter() - started


async def figure_decode(engine: EmbeddedEngine, model_dir: Path, sizes: Sizes) -> dict:
    tokenizer = engine.tokenizer
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS[: sizes.requests]]
    n, tokens = len(prompts), sizes.decode_tokens

    progress(f"figure 1: engine warm-up, then {n} concurrent requests x {tokens} tokens")
    await engine_batch(engine, prompts, 4)
    engine_tokens, engine_seconds = await engine_batch(engine, prompts, tokens)

    progress(f"figure 1: Hugging Face generate warm-up, then {n} sequential requests x {tokens} tokens")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    hf_sequential(model, prompts[:1], 4)
    hf_tokens, hf_seconds = hf_sequential(model, prompts, tokens)
    del model

    expected = n * tokens
    if engine_tokens != expected or hf_tokens != expected:
        raise RuntimeError(f"expected {expected} tokens; engine: {engine_tokens}, generate: {hf_tokens}")
    engine_rate, hf_rate = engine_tokens / engine_seconds, hf_tokens / hf_seconds
    return {
        "requests": n,
        "completion_tokens_each": tokens,
        "prompt_tokens": [len(p) for p in prompts],
        "engine_seconds": engine_seconds,
        "engine_tokens_per_s": engine_rate,
        "hf_generate_seconds": hf_seconds,
        "hf_generate_tokens_per_s": hf_rate,
        "speedup": engine_rate / hf_rate,
        "target_speedup": 3.0,
    }


# -- figure 2: prefix-cache time to first token ----------------------------------------------


def long_session(tokenizer, target_tokens: int) -> tuple[list[dict[str, str]], list[int]]:
    """A multi-turn chat whose rendered prompt has about ``target_tokens`` tokens."""
    messages = [{"role": "system", "content": "You are a patient tutor who answers in detail."}]
    turn = 0
    while True:
        topic = TOPICS[turn % len(TOPICS)]
        user = {"role": "user", "content": f"Question {turn + 1}: tell me about {topic}, with an example."}
        answer = (
            f"Here is an overview of {topic}. It is a broad subject, so I will cover the main ideas first "
            f"and then walk through example number {turn + 1} step by step, pointing out where people "
            f"usually get confused. The key point to remember about {topic} is that each part builds on "
            "the previous one, so it pays to understand the basics before the details."
        )
        candidate = messages + [user]
        ids = chat_ids(tokenizer, candidate)
        if len(ids) >= target_tokens:
            return candidate, ids
        messages = candidate + [{"role": "assistant", "content": answer}]
        turn += 1


def next_user_turn(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The tokens that close the assistant turn and add a new user turn plus the generation prompt."""
    history = messages + [{"role": "assistant", "content": "x"}]
    base = tokenizer.apply_chat_template(history, tokenize=False)
    user = {"role": "user", "content": "Thanks. Now compare the last two topics in one short paragraph."}
    full = tokenizer.apply_chat_template(history + [user], tokenize=False, add_generation_prompt=True)
    suffix = "<|im_end|>\n"  # the turn end the template writes after the (truncated) completion
    return tokenizer.encode(suffix + full[len(base) :], add_special_tokens=False)


async def run_request(
    engine: EmbeddedEngine, prompt: list[int], params: SamplingParams
) -> tuple[float, list[SampledToken], Finished]:
    """(seconds to the first SampledToken, sampled tokens, the Finished event)."""
    started = time.perf_counter()
    first = None
    tokens: list[SampledToken] = []
    async for event in engine.generate(prompt, params, cache_key="s"):
        if isinstance(event, SampledToken):
            first = first if first is not None else time.perf_counter() - started
            tokens.append(event)
        else:
            return first, tokens, event
    raise RuntimeError("the stream ended without Finished")


async def figure_prefix_ttft(engine: EmbeddedEngine, sizes: Sizes) -> dict:
    messages, turn1 = long_session(engine.tokenizer, sizes.session_tokens)
    if not sizes.session_tokens <= len(turn1) < sizes.session_tokens + 150:  # at most one turn over
        raise RuntimeError(f"the session prompt has {len(turn1)} tokens, not about {sizes.session_tokens}")
    progress(f"figure 2: session prompt of {len(turn1)} tokens, {sizes.ttft_reps} warm/cold repetitions")
    turn1_params = SamplingParams(max_tokens=8, temperature=1.0, seed=0, ignore_eos=True)
    turn2_params = SamplingParams(max_tokens=1, temperature=1.0, seed=1, ignore_eos=True)
    suffix = next_user_turn(engine.tokenizer, messages)

    warm, cold, cached, turn2_len = [], [], [], 0
    for rep in range(sizes.ttft_reps):
        engine.prefix_cache.clear()
        _, completion, _ = await run_request(engine, turn1, turn1_params)
        turn2 = turn1 + [t.token_id for t in completion] + suffix
        turn2_len = len(turn2)
        seconds, _, finished = await run_request(engine, turn2, turn2_params)
        warm.append(seconds)
        cached.append(finished.cached_prompt_tokens)

        engine.prefix_cache.clear()
        seconds, _, finished = await run_request(engine, turn2, turn2_params)
        if finished.cached_prompt_tokens:
            raise RuntimeError("the cold run hit the prefix cache")
        cold.append(seconds)
        progress(
            f"figure 2: repetition {rep + 1}: cached {warm[-1] * 1e3:.0f} ms, cold {cold[-1] * 1e3:.0f} ms"
        )
    engine.prefix_cache.clear()

    warm_ms, cold_ms = statistics.median(warm) * 1e3, statistics.median(cold) * 1e3
    return {
        "turn1_prompt_tokens": len(turn1),
        "turn2_prompt_tokens": turn2_len,
        "turn1_completion_tokens": turn1_params.max_tokens,
        "new_user_turn_tokens": len(suffix),
        "cached_prompt_tokens": cached,
        "cached_ttft_ms": [s * 1e3 for s in warm],
        "cold_ttft_ms": [s * 1e3 for s in cold],
        "cached_ttft_ms_median": warm_ms,
        "cold_ttft_ms_median": cold_ms,
        "speedup": cold_ms / warm_ms,
        "target_speedup": 5.0,
    }


# -- figure 3: recording cost -------------------------------------------------------------------

PLAIN_SCHEMA = """
CREATE TABLE calls (
    id TEXT PRIMARY KEY, session_id TEXT NOT NULL, seq INTEGER NOT NULL, dialect TEXT NOT NULL,
    model TEXT, status TEXT NOT NULL, finish_reason TEXT, prompt_len INTEGER NOT NULL,
    completion_len INTEGER NOT NULL, tokens BLOB NOT NULL, completion_logprobs BLOB NOT NULL,
    completion_versions BLOB NOT NULL, messages TEXT, response_message TEXT, created_at REAL NOT NULL
);
CREATE INDEX calls_by_session ON calls(session_id, seq);
"""


class PlainStore:
    """The baseline: each call one row with all its token ids in one blob, same SQLite settings."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(PLAIN_SCHEMA)
        self._seq: dict[str, int] = {}

    def record(self, call: CallRecord) -> None:
        seq = self._seq.get(call.session_id, 0)
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute(
            "INSERT INTO calls VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                call.id,
                call.session_id,
                seq,
                call.dialect,
                call.model,
                call.status,
                call.finish_reason,
                len(call.prompt_ids),
                len(call.completion_ids),
                array("i", call.prompt_ids + call.completion_ids).tobytes(),
                array("f", call.completion_logprobs).tobytes(),
                array("i", call.completion_versions).tobytes(),
                json.dumps(call.messages),
                json.dumps(call.response_message),
                call.created_at,
            ),
        )
        self._db.execute("COMMIT")
        self._seq[call.session_id] = seq + 1

    def close(self) -> None:
        self._db.close()


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def make_call(rng: random.Random, session_id: str, prompt: list[int], completion_len: int) -> CallRecord:
    return CallRecord(
        id=uuid.uuid4().hex,
        session_id=session_id,
        dialect="openai_chat",
        model=DEFAULT_MODEL,
        prompt_ids=prompt,
        completion_ids=random_ids(rng, completion_len),
        completion_logprobs=[-rng.random() * 5 for _ in range(completion_len)],
        completion_versions=[0] * completion_len,
        finish_reason="length",
    )


def fresh_calls(rng: random.Random, sizes: Sizes) -> list[CallRecord]:
    """Each call the first of its own session."""
    return [
        make_call(rng, f"fresh-{i}", random_ids(rng, sizes.record_prompt), sizes.record_completion)
        for i in range(sizes.record_calls)
    ]


def growing_calls(rng: random.Random, sizes: Sizes) -> list[list[CallRecord]]:
    """Sessions whose call k's prompt is call k-1's prompt + completion + new tokens."""
    growth = (sizes.record_prompt + sizes.record_completion) // sizes.growing_turns
    completion = growth // 4
    sessions = []
    for s in range(sizes.growing_sessions):
        path: list[int] = []
        calls = []
        for _ in range(sizes.growing_turns):
            prompt = path + random_ids(rng, growth - completion)
            call = make_call(rng, f"grow-{s}", prompt, completion)
            calls.append(call)
            path = call.prompt_ids + call.completion_ids
        sessions.append(calls)
    return sessions


def timed(record, calls: list[CallRecord]) -> list[float]:
    seconds = []
    for call in calls:
        started = time.perf_counter()
        record(call)
        seconds.append(time.perf_counter() - started)
    return seconds


def record_both(sessions: list[list[CallRecord]], folder: Path) -> dict:
    """Record every call in a fresh store and a fresh plain database, alternating session by session."""
    store, plain = SqliteTrajectoryStore(folder / "store.sqlite"), PlainStore(folder / "plain.sqlite")
    store_s, plain_s = [], []
    for calls in sessions:
        store_s += timed(store.record_call, calls)
        plain_s += timed(plain.record, calls)
    stored = sum(store.trie(calls[0].session_id).num_tokens for calls in sessions)
    store.close()
    plain.close()  # closing checkpoints the WAL into the database file, so the file sizes compare
    return {
        "store_s": store_s,
        "plain_s": plain_s,
        "stored_tokens": stored,
        "store_bytes": (folder / "store.sqlite").stat().st_size,
        "plain_bytes": (folder / "plain.sqlite").stat().st_size,
    }


def latency_summary(run: dict, picks: list[int] | None = None) -> dict:
    """p50/p90 of the store and the plain baseline (over the calls at ``picks`` only, if given)."""
    store_s, plain_s = run["store_s"], run["plain_s"]
    if picks is not None:
        store_s, plain_s = [store_s[i] for i in picks], [plain_s[i] for i in picks]
    store_p50, plain_p50 = percentile(store_s, 50) * 1e3, percentile(plain_s, 50) * 1e3
    return {
        "calls": len(store_s),
        "store_p50_ms": store_p50,
        "store_p90_ms": percentile(store_s, 90) * 1e3,
        "plain_p50_ms": plain_p50,
        "plain_p90_ms": percentile(plain_s, 90) * 1e3,
        "ratio_p50": store_p50 / plain_p50,
        "database_bytes_store": run["store_bytes"],
        "database_bytes_plain": run["plain_bytes"],
    }


def figure_recording(sizes: Sizes) -> dict:
    rng = random.Random(0)
    fresh = fresh_calls(rng, sizes)
    sessions = growing_calls(rng, sizes)
    progress(
        f"figure 3: recording {len(fresh)} fresh-session calls of {fresh[0].path_length} tokens and "
        f"{len(sessions)} sessions x {sizes.growing_turns} growing turns, store and plain baseline"
    )
    with tempfile.TemporaryDirectory(prefix="arborl-bench-") as tmp:
        (Path(tmp) / "fresh").mkdir()
        (Path(tmp) / "growing").mkdir()
        fresh_run = record_both([[call] for call in fresh], Path(tmp) / "fresh")
        growing_run = record_both(sessions, Path(tmp) / "growing")

    sent = sum(call.path_length for calls in sessions for call in calls)
    last_turns = [(s + 1) * sizes.growing_turns - 1 for s in range(len(sessions))]
    return {
        "fresh_8k": {"path_tokens": fresh[0].path_length, **latency_summary(fresh_run)},
        "growing_session": {
            "turns": sizes.growing_turns,
            "sessions": len(sessions),
            "last_path_tokens": sessions[0][-1].path_length,
            **latency_summary(growing_run),
            "last_turn": latency_summary(growing_run, last_turns),
            "stored_tokens": growing_run["stored_tokens"],
            "sum_call_tokens": sent,
            "stored_over_sum": growing_run["stored_tokens"] / sent,
        },
        "target_p50_ms": 2.0,
    }


# -- output ---------------------------------------------------------------------------------------


def table(title: str, rows: list[tuple[str, str]], figure: dict) -> str:
    other = figure["other_processes_cpu_cores"]
    load = "unknown" if other is None else f"{other:.2f} cores over {figure['figure_seconds']:.1f} s"
    rows = rows + [("other processes' CPU meanwhile", load)]
    lines = [f"### {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def pair(a: float, b: float, unit: str = "ms") -> str:
    return f"{a:.2f} / {b:.2f} {unit}"


def mib_pair(figure: dict) -> str:
    return pair(figure["database_bytes_store"] / 2**20, figure["database_bytes_plain"] / 2**20, "MiB")


def render(results: dict) -> str:
    d, p, r = results["batched_decode"], results["prefix_cache_ttft"], results["recording"]
    f, g = r["fresh_8k"], r["growing_session"]
    n, k = d["requests"], d["completion_tokens_each"]
    decode = [
        (
            f"EmbeddedEngine, {n} concurrent",
            f"{d['engine_tokens_per_s']:.1f} tok/s ({d['engine_seconds']:.2f} s)",
        ),
        (
            f"HF generate, {n} sequential (baseline)",
            f"{d['hf_generate_tokens_per_s']:.1f} tok/s ({d['hf_generate_seconds']:.2f} s)",
        ),
        ("speedup (target >= 3x)", f"{d['speedup']:.2f}x"),
    ]
    ttft = [
        ("cached TTFT", f"{p['cached_ttft_ms_median']:.1f} ms"),
        ("cold TTFT (baseline)", f"{p['cold_ttft_ms_median']:.1f} ms"),
        ("speedup (target >= 5x)", f"{p['speedup']:.1f}x"),
        ("Finished.cached_prompt_tokens", ", ".join(str(c) for c in p["cached_prompt_tokens"])),
    ]
    last = g["last_turn"]
    recording = [
        ("fresh call: record_call p50 / p90 (target p50 < 2 ms)", pair(f["store_p50_ms"], f["store_p90_ms"])),
        ("fresh call: plain insert p50 / p90 (baseline)", pair(f["plain_p50_ms"], f["plain_p90_ms"])),
        ("fresh call: store / plain (p50)", f"{f['ratio_p50']:.2f}x"),
        ("growing turn: record_call p50 / p90", pair(g["store_p50_ms"], g["store_p90_ms"])),
        ("growing turn: plain insert p50 / p90 (baseline)", pair(g["plain_p50_ms"], g["plain_p90_ms"])),
        ("growing turn: store / plain (p50)", f"{g['ratio_p50']:.2f}x"),
        (
            f"last turn ({g['last_path_tokens']} tokens): record_call / plain p50",
            pair(last["store_p50_ms"], last["plain_p50_ms"]),
        ),
        (
            "stored tokens / sum of call tokens (growing sessions)",
            f"{g['stored_tokens']} / {g['sum_call_tokens']} = {g['stored_over_sum']:.3f}",
        ),
        ("database size, store / plain (fresh calls)", mib_pair(f)),
        ("database size, store / plain (growing sessions)", mib_pair(g)),
    ]
    titles = [
        f"1. Batched decode throughput ({n} requests x {k} tokens, CPU fp32, {results['threads']} threads)",
        (
            f"2. Prefix-cache TTFT (turn 2 = {p['turn1_prompt_tokens']} + {p['turn1_completion_tokens']} "
            f"completion + {p['new_user_turn_tokens']} new tokens; median of {len(p['cold_ttft_ms'])})"
        ),
        (
            f"3. Recording cost ({f['calls']} fresh {f['path_tokens']}-token calls; "
            f"{g['sessions']} sessions x {g['turns']} growing turns up to {g['last_path_tokens']} tokens)"
        ),
    ]
    tables = zip(titles, (decode, ttft, recording), (d, p, r), strict=True)
    return "\n".join(table(title, rows, figure) for title, rows, figure in tables)


async def serving_figures(sizes: Sizes) -> dict:
    model_dir = resolve_model(DEFAULT_MODEL)
    progress(f"loading EmbeddedEngine from {model_dir}")
    engine = EmbeddedEngine(model_dir, device="cpu", dtype=torch.float32)
    await engine.start()
    try:
        with OtherLoad() as load:
            decode = await figure_decode(engine, model_dir, sizes)
        measured("figure 1", decode, load)
        with OtherLoad() as load:
            ttft = await figure_prefix_ttft(engine, sizes)
        measured("figure 2", ttft, load)
    finally:
        await engine.shutdown()
    return {"batched_decode": decode, "prefix_cache_ttft": ttft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, only to check the script works")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    mode = "quick" if args.quick else "full"
    progress(f"{mode} run, torch {torch.__version__}, {torch.get_num_threads()} threads")

    results = {
        "mode": mode,
        "model": DEFAULT_MODEL,
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        **asyncio.run(serving_figures(sizes)),
    }
    with OtherLoad() as load:
        results["recording"] = figure_recording(sizes)
    measured("figure 3", results["recording"], load)
    results["elapsed_s"] = time.perf_counter() - started

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / ("serving.quick.json" if args.quick else "serving.json")
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    progress(f"done in {results['elapsed_s']:.0f} s; figures written to {path}")


if __name__ == "__main__":
    main()
