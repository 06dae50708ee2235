"""Hugging Face <-> megatron-core weights for Llama / Qwen2 models, one tensor-parallel rank at a time.

    Hugging Face (model.*)                          megatron GPTModel, rank r of t
    embed_tokens.weight        [V, H]               embedding.word_embeddings.weight     rows r/t
                                                      (of V rounded up to t's multiple, zeros)
    layers.i.input_layernorm.weight                 decoder.layers.i.input_layernorm.weight  (whole)
    layers.i.self_attn.{q,k,v}_proj.{weight,bias}   decoder.layers.i.self_attention.linear_qkv.*
                                                      per KV group g: [q heads of g; k_g; v_g],
                                                      groups r*G/t .. (r+1)*G/t - 1
    layers.i.self_attn.o_proj.weight [H, nq*d]      ...self_attention.linear_proj.weight  columns r/t
    layers.i.post_attention_layernorm.weight        decoder.layers.i.pre_mlp_layernorm.weight (whole)
    layers.i.mlp.{gate,up}_proj.weight [I, H]       decoder.layers.i.mlp.linear_fc1.weight
                                                      [gate rows r/t; up rows r/t]
    layers.i.mlp.down_proj.weight    [H, I]         decoder.layers.i.mlp.linear_fc2.weight  columns r/t
    norm.weight                                     decoder.final_layernorm.weight  (whole)
    lm_head.weight (untied only)                    output_layer.weight  rows r/t

Invariant (tested): ``to_hf(config, [to_megatron(config, hf, r, t) for r in range(t)]) == hf``
exactly, for any t that divides the heads, KV heads, intermediate size and vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .megatron_model import head_dim, padded_vocab

Weights = Mapping[str, torch.Tensor]


def is_replicated(name: str) -> bool:
    """Whether every TP rank holds the whole of megatron weight ``name`` (the RMSNorm weights),
    rather than its own shard. (Megatron marks sharded parameters only when it initialises them,
    and these are loaded instead.)"""
    return name.endswith("layernorm.weight")


def _qkv(config: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    """Megatron's fused qkv rows (or bias) for this rank: each KV group's query heads, key, value."""
    groups, d = config.num_key_value_heads, head_dim(config)
    per_group = config.num_attention_heads // groups
    q = q.reshape(groups, per_group * d, *q.shape[1:])
    k, v = k.reshape(groups, d, *k.shape[1:]), v.reshape(groups, d, *v.shape[1:])
    fused = torch.cat((q, k, v), dim=1)  # [groups, (per_group + 2) * d, ...]
    return fused.chunk(ranks, dim=0)[rank].reshape(-1, *q.shape[2:])


def _split_qkv(config: Any, shards: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d = config.num_key_value_heads, head_dim(config)
    per_group = config.num_attention_heads // groups
    fused = torch.cat(list(shards), dim=0).reshape(groups, (per_group + 2) * d, *shards[0].shape[1:])
    q, k, v = fused.split((per_group * d, d, d), dim=1)
    return (q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]))


def to_megatron(config: Any, hf: Callable[[str], torch.Tensor] | Weights, rank: int, ranks: int
                ) -> dict[str, torch.Tensor]:
    """Rank ``rank`` of ``ranks``'s megatron state dict from Hugging Face weights (a mapping, or a
    function from a name to its tensor, so a loader reads only what it is asked for)."""
    get = hf.__getitem__ if isinstance(hf, Mapping) else hf
    padding = padded_vocab(config, ranks) - config.vocab_size

    def vocab_rows(name: str) -> torch.Tensor:
        whole = get(name)
        return torch.cat((whole, whole.new_zeros(padding, *whole.shape[1:]))).chunk(ranks, 0)[rank]

    out = {"embedding.word_embeddings.weight": vocab_rows("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": get("model.norm.weight")}
    if not config.tie_word_embeddings:
        out["output_layer.weight"] = vocab_rows("lm_head.weight")
    for i in range(config.num_hidden_layers):
        hf_layer, layer = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf_layer + "self_attn."
        out[layer + "input_layernorm.weight"] = get(hf_layer + "input_layernorm.weight")
        out[layer + "self_attention.linear_qkv.weight"] = _qkv(
            config, get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight"), rank, ranks)
        if config.model_type == "qwen2":
            out[layer + "self_attention.linear_qkv.bias"] = _qkv(
                config, get(attn + "q_proj.bias"), get(attn + "k_proj.bias"), get(attn + "v_proj.bias"), rank, ranks)
        out[layer + "self_attention.linear_proj.weight"] = get(attn + "o_proj.weight").chunk(ranks, 1)[rank]
        out[layer + "pre_mlp_layernorm.weight"] = get(hf_layer + "post_attention_layernorm.weight")
        gate, up = get(hf_layer + "mlp.gate_proj.weight"), get(hf_layer + "mlp.up_proj.weight")
        out[layer + "mlp.linear_fc1.weight"] = torch.cat((gate.chunk(ranks, 0)[rank], up.chunk(ranks, 0)[rank]))
        out[layer + "mlp.linear_fc2.weight"] = get(hf_layer + "mlp.down_proj.weight").chunk(ranks, 1)[rank]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def to_hf(config: Any, shards: Sequence[Weights]) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict from every tensor-parallel rank's megatron state dict (rank order).
    Tied models have no ``lm_head.weight`` (Hugging Face ties it to ``embed_tokens`` on load)."""
    def cat(name: str, dim: int) -> torch.Tensor:
        return torch.cat([shard[name] for shard in shards], dim=dim)

    first = shards[0]
    def vocab_rows(name: str) -> torch.Tensor:  # without the padding, in a tensor of its own
        whole = cat(name, 0)
        return whole if whole.shape[0] == config.vocab_size else whole[: config.vocab_size].clone()

    out = {"model.embed_tokens.weight": vocab_rows("embedding.word_embeddings.weight"),
           "model.norm.weight": first["decoder.final_layernorm.weight"]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = vocab_rows("output_layer.weight")
    for i in range(config.num_hidden_layers):
        hf_layer, layer = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf_layer + "self_attn."
        out[hf_layer + "input_layernorm.weight"] = first[layer + "input_layernorm.weight"]
        kinds = ("weight", "bias") if config.model_type == "qwen2" else ("weight",)
        for kind in kinds:
            q, k, v = _split_qkv(config, [shard[layer + "self_attention.linear_qkv." + kind] for shard in shards])
            out[attn + "q_proj." + kind], out[attn + "k_proj." + kind], out[attn + "v_proj." + kind] = q, k, v
        out[attn + "o_proj.weight"] = cat(layer + "self_attention.linear_proj.weight", 1)
        out[hf_layer + "post_attention_layernorm.weight"] = first[layer + "pre_mlp_layernorm.weight"]
        gates, ups = zip(*(shard[layer + "mlp.linear_fc1.weight"].chunk(2, 0) for shard in shards), strict=True)
        out[hf_layer + "mlp.gate_proj.weight"] = torch.cat(gates)
        out[hf_layer + "mlp.up_proj.weight"] = torch.cat(ups)
        out[hf_layer + "mlp.down_proj.weight"] = cat(layer + "mlp.linear_fc2.weight", 1)
    return {name: tensor.contiguous() for name, tensor in out.items()}


def hf_tensor_reader(folder: Path) -> Callable[[str], torch.Tensor]:
    """A function from a Hugging Face weight name to its tensor, read from ``folder``'s safetensors
    files (one or sharded) on demand."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))

    def read(name: str) -> torch.Tensor:
        if name not in where:
            raise KeyError(f"{folder} holds no weight {name!r}")
        with safe_open(where[name], framework="pt") as f:
            return f.get_tensor(name)

    return read
