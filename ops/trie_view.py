"""Draw one session's prefix tree as text (for a terminal) or as a self-contained HTML page.

The point of the view is to check, by eye, that a session was recorded as it should be: a
multi-turn conversation stitched perfectly is one chain, every prefix break shows up as a fork
with the reason the gateway gave, and the header says how much the trie saved over storing
each call's tokens separately (stored tokens / sum of call path lengths).

Both renderers read the session once into a ``_SessionView`` and draw it iteratively, so a
session hundreds of turns deep neither hits the recursion limit nor drifts off the right edge:
a node with a single child continues its chain at the same indentation, only forks indent.
"""

from __future__ import annotations

import html
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from arborl.rollout.records import StoredCall
from arborl.rollout.store import TrajectoryStore
from arborl.rollout.trie import Trie, TrieNode


class Decoder(Protocol):
    """Anything that turns token ids back into text (a Hugging Face tokenizer, or a test fake)."""

    def decode(self, ids: list[int], /) -> str: ...


Interval = tuple[int, int]  # [start, end) in path positions


@dataclass
class _SessionView:
    """Everything both renderers need, computed once from the store."""

    session_id: str
    trie: Trie
    calls: list[StoredCall]
    children: dict[int | None, list[int]]  # None -> roots; ids sorted, so the drawing is stable
    calls_at: dict[int, list[StoredCall]]  # calls ending at each node, by seq
    branched_at: dict[int, list[StoredCall]]  # calls with a branch_reason, at the node where they left
    sampled: dict[int, list[Interval]]  # merged completion-token intervals inside each node
    orphans: list[StoredCall]  # calls whose node is missing from the trie (should never happen)
    breaks: Counter[str] = field(default_factory=Counter)

    @property
    def stored_tokens(self) -> int:
        return self.trie.num_tokens

    @property
    def path_tokens(self) -> int:
        return sum(call.prompt_len + call.completion_len for call in self.calls)

    @property
    def ratio(self) -> float | None:
        return self.stored_tokens / self.path_tokens if self.path_tokens else None

    @property
    def versions(self) -> list[int]:
        return sorted({v for call in self.calls for v in call.completion_versions})


def _collect(store: TrajectoryStore, session_id: str) -> _SessionView:
    trie = store.trie(session_id)
    calls = sorted(store.calls(session_id), key=lambda c: c.seq)
    if not trie.nodes and not calls and not store.refusals(session_id):
        raise KeyError(f"no session {session_id!r} in {store.location}")
    nodes = trie.nodes

    children: dict[int | None, list[int]] = {None: []}
    for node in nodes.values():
        children.setdefault(node.parent, []).append(node.id)
    for kids in children.values():
        kids.sort()

    calls_at: dict[int, list[StoredCall]] = {}
    branched_at: dict[int, list[StoredCall]] = {}
    sampled: dict[int, list[Interval]] = {}
    orphans: list[StoredCall] = []
    covered: set[int] = set()  # nodes on the path of an earlier call; closed under "parent of"
    for call in calls:
        if call.node_id not in nodes:
            orphans.append(call)
            continue
        calls_at.setdefault(call.node_id, []).append(call)
        # The completion occupies path positions [prompt_len, end); a later split can spread it
        # over several nodes, so walk up until the node that holds its first token.
        current: int | None = call.node_id
        while current is not None:
            node = nodes[current]
            if node.end <= call.prompt_len:
                break
            sampled.setdefault(current, []).append((max(node.start, call.prompt_len), node.end))
            if node.start <= call.prompt_len:
                break
            current = node.parent
        # Where the call left the tree earlier calls had built: the topmost node on its path no
        # earlier call went through (its own end node if it only retraced an earlier path).
        first_new, current = None, call.node_id
        while current is not None and current not in covered:
            covered.add(current)
            first_new, current = current, nodes[current].parent
        if call.branch_reason:
            branched_at.setdefault(first_new if first_new is not None else call.node_id, []).append(call)

    return _SessionView(
        session_id=session_id,
        trie=trie,
        calls=calls,
        children=children,
        calls_at=calls_at,
        branched_at=branched_at,
        sampled={nid: _merge(spans) for nid, spans in sampled.items()},
        orphans=orphans,
        breaks=Counter(call.branch_reason for call in calls if call.branch_reason),
    )


def _merge(spans: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


# -- shared formatting ----------------------------------------------------------------------


def _ids_preview(tokens: Sequence[int], show: int) -> str:
    if len(tokens) <= show:
        return " ".join(map(str, tokens))
    head, tail = (show + 1) // 2, show // 2
    return " ".join(map(str, tokens[:head])) + " … " + " ".join(map(str, tokens[len(tokens) - tail :]))


def _text_preview(tokenizer: Decoder, tokens: list[int], max_chars: int) -> str:
    """Head and tail of the node's text; decodes at most ~max_chars tokens, as nodes can be huge."""
    if len(tokens) <= max_chars:
        text = tokenizer.decode(tokens)
        if len(text) <= max_chars:
            return text
    half = max(1, max_chars // 2)
    head = tokenizer.decode(tokens[:half])[:half]
    tail = tokenizer.decode(tokens[-half:])[-half:]
    return head + " … " + tail


def _breaks_text(breaks: Counter[str]) -> str:
    if not breaks:
        return "0"
    return ", ".join(f"{reason}={n}" for reason, n in sorted(breaks.items()))


def _call_fields(call: StoredCall) -> str:
    versions = "[" + ",".join(map(str, call.versions)) + "]"
    text = (
        f"call {call.id[:8]} #{call.seq} prompt={call.prompt_len} completion={call.completion_len} "
        f"versions={versions} finish={call.finish_reason or '-'} status={call.status}"
    )
    if not call.token_exact:
        text += " token_exact=no"
    if call.branch_reason:
        text += f" branch={call.branch_reason}"
    return text


def _completion_fields(call: StoredCall, node: TrieNode) -> str:
    end = call.prompt_len + call.completion_len
    text = f"completion: {call.completion_len} tok @{call.prompt_len}..{end}"
    in_node = end - max(node.start, call.prompt_len)
    if in_node < call.completion_len:
        text += f" ({in_node} in this node)"
    if call.completion_logprobs:
        mean = sum(call.completion_logprobs) / len(call.completion_logprobs)
        text += f", mean logprob {mean:.2f}"
    return text


# -- text -----------------------------------------------------------------------------------


def render_trie_text(
    store: TrajectoryStore, session_id: str, *, tokenizer: Decoder | None = None, show_tokens: int = 8
) -> str:
    """The session's tree for a terminal: a summary line, then one line per node plus its calls."""
    view = _collect(store, session_id)
    ratio = f"{view.ratio:.3f}" if view.ratio is not None else "-"
    header = (
        f"session {session_id}: {len(view.calls)} call{'' if len(view.calls) == 1 else 's'}, "
        f"{len(view.trie.nodes)} nodes, "
        f"{view.stored_tokens} stored tok, {view.path_tokens} call tok, stored/sum {ratio}, "
        f"breaks: {_breaks_text(view.breaks)}"
    )
    lines = [header]

    stack: list[tuple[int, str, str]] = []  # (node id, prefix of its own line, prefix below it)

    def push_children(kids: list[int], rest: str) -> None:
        if len(kids) == 1:  # a chain continues at the same indentation
            stack.append((kids[0], rest, rest))
            return
        for i in reversed(range(len(kids))):
            last = i == len(kids) - 1
            stack.append((kids[i], rest + ("└── " if last else "├── "), rest + ("    " if last else "│   ")))

    push_children(view.children[None], "")
    while stack:
        nid, first, rest = stack.pop()
        node = view.trie.nodes[nid]
        kids = view.children.get(nid, [])
        line = f"[node {nid}] {len(node.tokens)} tok @{node.start}..{node.end}"
        if show_tokens > 0:
            line += f"  ids=[{_ids_preview(node.tokens, show_tokens)}]"
        if tokenizer is not None:
            line += f"  text={_text_preview(tokenizer, node.tokens, 60)!r}"
        lines.append(first + line)
        detail = rest + ("│ " if kids else "  ")
        for call in view.branched_at.get(nid, []):
            lines.append(f"{detail}branched here: {call.branch_reason} (call {call.id[:8]} #{call.seq})")
        for call in view.calls_at.get(nid, []):
            lines.append(detail + _call_fields(call))
            lines.append(detail + "  " + _completion_fields(call, node))
        push_children(kids, rest)

    for call in view.orphans:
        lines.append(f"! {_call_fields(call)}: node {call.node_id} missing from the trie")
    for at, reason in store.refusals(session_id):
        lines.append(f"refused before any token at {_when(at)}: {reason}")
    return "\n".join(lines) + "\n"


# -- HTML -----------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
code, .ids { font-family: ui-monospace, monospace; }
table.summary { border-collapse: collapse; margin-bottom: 1em; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 2px 10px; text-align: left; }
table.summary th { background: #f4f4f4; font-weight: 600; }
.legend span.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle;
  border: 1px solid #999; margin: 0 4px 0 12px; }
.p { background: #cfe3ff; }
.c { background: #ffbf69; }
ol.chain, ul.fork { list-style: none; margin: 0; }
ol.chain { padding-left: 10px; border-left: 2px solid #bbb; }
ul.fork { padding-left: 18px; }
ul.fork > li { margin: 4px 0; }
summary { cursor: pointer; color: #555; }
.row { display: flex; align-items: flex-start; gap: 12px; margin: 6px 0; }
.node { flex: none; border: 1px solid #777; border-radius: 4px; background: #fff; overflow: hidden; }
.bar { display: flex; height: 10px; }
.bar span { display: block; height: 100%; }
.label { padding: 1px 6px; white-space: nowrap; font-size: 12px; }
.info { font-size: 12px; }
.info ul { margin: 0; padding-left: 1.2em; }
.ids { color: #777; }
.branch { display: inline-block; background: #ffe0e0; color: #a00; border: 1px solid #e99;
  border-radius: 3px; padding: 0 4px; margin: 1px 0; }
.error, .cancelled { color: #a00; }
"""


def _box_width(tokens: int) -> int:
    """Pixels for a node of ``tokens`` tokens: log scale, so a 30k-token prompt stays on screen."""
    return min(900, int(60 + 40 * math.log2(1 + tokens)))


def _bar(node: TrieNode, sampled: list[Interval]) -> str:
    """The node's tokens as prompt/completion segments, widths proportional to token counts."""
    segments: list[tuple[str, int]] = []
    at = node.start
    for a, b in sampled:
        if a > at:
            segments.append(("p", a - at))
        segments.append(("c", b - a))
        at = b
    if at < node.end:
        segments.append(("p", node.end - at))
    total = max(1, len(node.tokens))
    names = {"p": "prompt", "c": "completion"}
    return "".join(
        f'<span class="{kind}" style="width:{100 * n / total:.3f}%" title="{n} {names[kind]} tok"></span>'
        for kind, n in segments
    )


def _html_node(view: _SessionView, nid: int, tokenizer: Decoder | None) -> str:
    node = view.trie.nodes[nid]
    sampled = view.sampled.get(nid, [])
    n_sampled = sum(b - a for a, b in sampled)
    title = ""
    if tokenizer is not None:
        title = f' title="{html.escape(_text_preview(tokenizer, node.tokens, 400))}"'
    label = f"node {nid} · {len(node.tokens)} tok"
    if n_sampled:
        label += f" ({n_sampled} completion)"
    info = [
        f'<span class="ids">@{node.start}..{node.end} [{html.escape(_ids_preview(node.tokens, 8))}]</span>'
    ]
    for call in view.branched_at.get(nid, []):
        info.append(
            f'<br><span class="branch">branched here: {html.escape(call.branch_reason or "")} '
            f"(call {html.escape(call.id[:8])} #{call.seq})</span>"
        )
    calls = view.calls_at.get(nid, [])
    if calls:
        items = "".join(
            f'<li class="{html.escape(call.status)}">{html.escape(_call_fields(call))}<br>'
            f"{html.escape(_completion_fields(call, node))}</li>"
            for call in calls
        )
        info.append(f"<ul>{items}</ul>")
    return (
        f'<div class="row"><div class="node" style="width:{_box_width(len(node.tokens))}px"{title}>'
        f'<div class="bar">{_bar(node, sampled)}</div><div class="label">{html.escape(label)}</div></div>'
        f'<div class="info">{"".join(info)}</div></div>'
    )


def _fork_summary(view: _SessionView, nid: int) -> str:
    node = view.trie.nodes[nid]
    text = f"node {nid}: {len(node.tokens)} tok from @{node.start}"
    reasons = sorted({call.branch_reason or "" for call in view.branched_at.get(nid, [])})
    badges = "".join(f' <span class="branch">{html.escape(r)}</span>' for r in reasons)
    return html.escape(text) + badges


def _html_tree(view: _SessionView, tokenizer: Decoder | None) -> list[str]:
    """Chains as <ol>, forks as <ul> of collapsible <details>; built with a stack, not recursion."""
    out: list[str] = []
    stack: list[str | int] = []  # a str is emitted as is, an int starts a chain at that node

    def push_fork(kids: list[int], closing: str) -> None:
        out.append('<ul class="fork">')
        stack.append("</ul>" + closing)
        for kid in reversed(kids):
            stack.append("</details></li>")
            stack.append(kid)
            stack.append(f"<li><details open><summary>{_fork_summary(view, kid)}</summary>")

    roots = view.children[None]
    if len(roots) == 1:
        stack.append(roots[0])
    elif roots:
        push_fork(roots, "")
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        out.append('<ol class="chain">')
        nid = item
        while True:
            out.append(f'<li id="node-{nid}">{_html_node(view, nid, tokenizer)}')
            kids = view.children.get(nid, [])
            if len(kids) == 1:
                out.append("</li>")
                nid = kids[0]
                continue
            if kids:
                push_fork(kids, "</li></ol>")
            else:
                out.append("</li></ol>")
            break
    return out


def _summary_rows(view: _SessionView) -> list[tuple[str, str]]:
    ratio = f"{view.ratio:.3f}" if view.ratio is not None else "-"
    rows = [
        ("calls", str(len(view.calls))),
        ("nodes", str(len(view.trie.nodes))),
        ("stored tokens", str(view.stored_tokens)),
        ("sum of call tokens", str(view.path_tokens)),
        ("stored / sum", ratio),
        ("prefix breaks", _breaks_text(view.breaks)),
        ("policy versions", ", ".join(map(str, view.versions)) or "-"),
    ]
    if view.orphans:
        rows.append(("calls missing their node", ", ".join(call.id[:8] for call in view.orphans)))
    return rows


def render_trie_html(store: TrajectoryStore, session_id: str, *, tokenizer: Decoder | None = None) -> str:
    """The session's tree as one self-contained page: inline CSS, no scripts, no external assets."""
    view = _collect(store, session_id)
    sid = html.escape(session_id)
    table = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary_rows(view)
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>arborl trie: {sid}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Session <code>{sid}</code></h1>",
        f'<table class="summary">{table}</table>',
        '<p class="legend">Box width grows with the log of the token count.<span class="swatch p"></span>'
        + 'prompt tokens<span class="swatch c"></span>completion tokens</p>',
        '<div class="tree">',
        *_html_tree(view, tokenizer),
        "</div>",
        *[f"<p>refused before any token at {_when(at)}: {html.escape(reason)}</p>"
          for at, reason in store.refusals(session_id)],
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
