"""The trie view over a real store: chains stay chains, forks show their reason, HTML is escaped."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from arborl.ops.trie_view import render_trie_html, render_trie_text
from arborl.rollout.records import CallRecord
from arborl.rollout.store import SqliteTrajectoryStore, TrajectoryStore

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr"}


class FakeTokenizer:
    """Decodes ids as their decimal text; ``tag`` lets a test smuggle markup into the output."""

    def __init__(self, tag: str = ""):
        self.tag = tag

    def decode(self, ids: list[int]) -> str:
        return self.tag + " ".join(map(str, ids))


def _call(call_id: str, session_id: str, prompt: list[int], completion: list[int], **kw) -> CallRecord:
    return CallRecord(
        id=call_id,
        session_id=session_id,
        dialect="openai_chat",
        model="m",
        prompt_ids=prompt,
        completion_ids=completion,
        completion_logprobs=[-0.5] * len(completion),
        completion_versions=[0] * len(completion),
        finish_reason="stop",
        **kw,
    )


@pytest.fixture
def store(tmp_path):
    s = SqliteTrajectoryStore(tmp_path / "traj.db")
    yield s
    s.close()


def _three_turns(store: TrajectoryStore) -> list[int]:
    prompt = [1, 2, 3, 4, 5, 6]
    completion = [10, 11, 12, 13]
    for turn in range(3):
        store.record_call(_call(f"turn{turn}-call", "chain", prompt, completion))
        prompt = prompt + completion + [100 + turn, 101 + turn]
        completion = [200 + 10 * turn + i for i in range(4)]
    calls = store.calls("chain")
    return store.trie("chain").path(calls[-1].node_id)


def test_single_path_session_is_one_chain(store):
    final_path = _three_turns(store)
    text = render_trie_text(store, "chain", tokenizer=FakeTokenizer())
    lines = text.splitlines()
    stored = sum(len(n.tokens) for n in store.trie("chain").nodes.values())
    assert stored == len(final_path)
    assert lines[0].startswith("session chain: 3 calls, 3 nodes, ")
    assert f"{stored} stored tok" in lines[0]
    assert "breaks: 0" in lines[0]
    node_lines = [line for line in lines if "[node " in line]
    assert len(node_lines) == 3
    assert all(line.startswith("[node ") for line in node_lines)  # no indentation: one chain
    assert "├──" not in text and "└──" not in text
    assert re.findall(r"call (\S+) #(\d)", text) == [("turn0-ca", "0"), ("turn1-ca", "1"), ("turn2-ca", "2")]
    assert "#2 prompt=18 completion=4 versions=[0] finish=stop status=ok" in text
    assert "completion: 4 tok @6..10, mean logprob -0.50" in text
    assert "text='1 2 3 4 5 6 10 11 12 13'" in text


def test_branching_session_shows_both_branches_and_reason(store):
    store.record_call(_call("aaaaaaaa-1", "fork", [1, 2, 3, 4, 5, 6], [7, 8]))
    store.record_call(_call("bbbbbbbb-2", "fork", [1, 2, 3, 9, 9], [10], branch_reason="history_edited"))
    text = render_trie_text(store, "fork", show_tokens=4)
    assert "3 nodes" in text.splitlines()[0]
    assert "breaks: history_edited=1" in text.splitlines()[0]
    assert "├── [node " in text and "└── [node " in text
    assert "] 3 tok @0..3  ids=[1 2 3]" in text  # the shared head, split off the first path
    assert "ids=[4 5 … 7 8]" in text
    assert "call aaaaaaaa #0 prompt=6 completion=2" in text
    assert (
        "call bbbbbbbb #1 prompt=5 completion=1 versions=[0] finish=stop status=ok branch=history_edited"
        in text
    )
    assert "branched here: history_edited (call bbbbbbbb #1)" in text


def test_completion_split_by_a_later_branch_is_counted_across_nodes(store):
    store.record_call(_call("c1", "s", [1, 2], [3, 4, 5, 6]))
    store.record_call(_call("c2", "s", [1, 2, 3, 4], [9]))  # re-prompts inside c1's completion
    text = render_trie_text(store, "s")
    assert "completion: 4 tok @2..6 (2 in this node)" in text
    page = render_trie_html(store, "s")
    assert "(2 completion)" in page  # the shared head holds two of c1's completion tokens


def test_unknown_session_raises_key_error(store):
    _three_turns(store)
    with pytest.raises(KeyError, match="no session 'nope'"):
        render_trie_text(store, "nope")
    with pytest.raises(KeyError):
        render_trie_html(store, "nope")


class StrictParser(HTMLParser):
    """Fails on a closing tag that does not match the open one, so the nesting is checked."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.titles: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)
        self.titles += [value for name, value in attrs if name == "title" and value]

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_well_formed_and_escaped(store):
    store.record_call(_call("aaaaaaaa-1", "s<1>", [1, 2, 3, 4, 5, 6], [7, 8]))
    store.record_call(_call("bbbbbbbb-2", "s<1>", [1, 2, 3, 9, 9], [10], branch_reason="history_edited"))
    page = render_trie_html(store, "s<1>", tokenizer=FakeTokenizer("<script>alert(1)</script>"))
    assert "<script" not in page
    assert "&lt;script&gt;" in page
    assert "s&lt;1&gt;" in page
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    text = " ".join(parser.text)
    assert "s<1>" in text  # the session id, unescaped by the parser
    for label, value in [
        ("calls", "2"),
        ("nodes", "3"),
        ("stored tokens", "11"),
        ("sum of call tokens", "14"),
        ("prefix breaks", "history_edited=1"),
        ("policy versions", "0"),
    ]:
        assert f"<th>{label}</th><td>{value}</td>" in page
    assert "history_edited" in text
    assert len(parser.titles) >= 3 and any(
        t.startswith("<script>alert(1)</script>1 2 3") for t in parser.titles
    )
    assert 'class="c"' in page and 'class="p"' in page  # completion and prompt segments


def test_html_without_tokenizer_single_chain(store):
    _three_turns(store)
    page = render_trie_html(store, "chain")
    parser = StrictParser()
    parser.feed(page)
    assert parser.stack == []
    assert 'class="fork"' not in page
    assert page.count('<li id="node-') == 3
