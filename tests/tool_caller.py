"""A tiny model that has learnt to call a tool, so tests see real, parsed tool calls.

The random tiny Llama is fine-tuned for a few seconds to answer every assistant turn of a
weather conversation (rendered exactly as the gateway renders it, Hermes tool prompt included)
with the same ``get_weather`` call. Greedy decoding then reproduces the call token by token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from arborl.gateway.rendering import ChatRenderer
from arborl.gateway.tool_parsers import get_parser

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_ARGUMENTS = {"city": "Paris"}
TOOL_RESULT = "sunny, 21 C"


def conversation(turns: int) -> list[dict]:
    """The normalised conversation after ``turns`` completed tool round trips."""
    messages: list[dict] = [{"role": "user", "content": "What is the weather in Paris?"}]
    for k in range(turns):
        call = {"id": f"call_{k}", "name": "get_weather", "arguments": '{"city": "Paris"}'}
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{k}", "content": TOOL_RESULT})
    return messages


def train_tool_caller(base_dir: Path, out_dir: Path, *, max_turns: int = 12, steps: int = 150) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    renderer = ChatRenderer(tokenizer, get_parser("hermes"))
    answer = renderer.tool_parser.format_call("get_weather", CALL_ARGUMENTS) + tokenizer.eos_token
    target = renderer.encode(answer)
    examples = []
    for turns in range(max_turns):
        prompt = renderer.encode(renderer.render(conversation(turns), [WEATHER_TOOL]).text)
        ids = torch.tensor([prompt + target])
        # Logits only where the answer is predicted: the prompt's last token onwards.
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1)
        examples.append((ids, positions, torch.tensor(target)))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        ids, positions, labels = examples[step % len(examples)]
        logits = model(input_ids=ids, logits_to_keep=positions).logits[0]
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
