"""A Llama- or Qwen2-family Hugging Face model as a megatron-core GPTModel, and its packed forward.

    embedding (vocab-parallel)  ->  decoder: layers of [RMSNorm, SelfAttention (column-parallel
    qkv, tree core attention, row-parallel proj), RMSNorm, gated MLP], final RMSNorm  ->  the
    fused logprob kernel over the LM head gathered from the tensor-parallel ranks

The layers are megatron-core's own local spec (no Transformer Engine), with one part replaced:
the core attention, which here is arborl's tree attention (``kernels.tree_attention``) instead
of megatron's causal ``DotProductAttention``. The packed forward calls the embedding and the
decoder itself rather than ``GPTModel.forward``, for two reasons that are correctness, not taste:

- RoPE by depth: ``GPTModel.forward`` builds rotary embeddings from ``arange(seq_len)`` and
  ignores ``position_ids``; in a packed trie a token's position is its depth, so the rotary
  angles are built here from the batch's ``position_ids`` (float32, as Hugging Face does);
- the head at parents only: the logprob of token t is read from the hidden state at
  ``parent[t]`` by the chunked kernel, so the [tokens x vocab] logits never exist.

Invariants: every tensor-parallel rank of a group gets the same batch and returns the same
(replicated) logprobs; the forward's collectives are those of megatron's layers plus one
all-gather of the head's vocabulary shards, all inside the tensor-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from arborl.kernels.fused_logprob import token_logprob_and_entropy
from arborl.kernels.tree_attention import TreeMask, tree_attention_function
from arborl.learner.packing import PackedBatch

from .base import BackendRefused

FAMILIES = ("llama", "qwen2")


@dataclass
class TreeAttentionMask:
    """What the packed forward hands megatron's layers as their ``attention_mask``: the trie and
    the tree attention implementation to run on it (megatron passes it through to the core
    attention untouched)."""

    tree: TreeMask
    implementation: str


def refuse_unsupported(hf_config: Any, *, tensor_parallel: int) -> None:
    """``BackendRefused`` for a model this mapping does not cover, or a TP size it cannot split."""
    family = getattr(hf_config, "model_type", None)
    if family not in FAMILIES:
        raise BackendRefused(f"the megatron backend maps {', '.join(FAMILIES)} models; this one is {family!r}")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise BackendRefused(f"the megatron backend runs plain RoPE; this model uses {rope.get('rope_type')!r} "
                             "rope scaling")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise BackendRefused(f"the megatron backend maps SiLU-gated MLPs; this model uses {hf_config.hidden_act!r}")
    if getattr(hf_config, "mlp_bias", False) or (family == "llama" and getattr(hf_config, "attention_bias", False)):
        raise BackendRefused("the megatron backend maps Llama models without attention or MLP biases")
    dropout = {key: value for key, value in vars(hf_config).items()
               if "dropout" in key and isinstance(value, (int, float)) and value > 0}
    if dropout:  # megatron's layers are built without it: training with it would need it mapped
        raise BackendRefused(f"the megatron backend trains without dropout; this model's config asks for {dropout}")
    if any(kind != "full_attention" for kind in getattr(hf_config, "layer_types", None) or ()):
        raise BackendRefused("the megatron backend runs full attention in every layer (no sliding window)")
    for what, count in (("num_attention_heads", hf_config.num_attention_heads),
                        ("num_key_value_heads", hf_config.num_key_value_heads),
                        ("intermediate_size", hf_config.intermediate_size)):
        if count % tensor_parallel:
            raise BackendRefused(f"learner.tensor_parallel={tensor_parallel} does not divide the model's "
                                 f"{what} ({count})")


def padded_vocab(hf_config: Any, tensor_parallel: int) -> int:
    """The vocabulary rounded up to a multiple of the TP size: each rank holds as many rows (the
    padding rows are zeros, never looked up, and cut from the head before any softmax)."""
    return -(-hf_config.vocab_size // tensor_parallel) * tensor_parallel


def head_dim(hf_config: Any) -> int:
    return int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)


def transformer_config(hf_config: Any, *, tensor_parallel: int, dtype: torch.dtype, cpu: bool):
    """Megatron's TransformerConfig for the Hugging Face config: the same arithmetic, in ``dtype``,
    no dropout and no fused kernels (they are CUDA-only or change the numbers)."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads, num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim(hf_config), ffn_hidden_size=hf_config.intermediate_size,
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=1,
        normalization="RMSNorm", layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, add_qkv_bias=hf_config.model_type == "qwen2",
        hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=cpu, perform_initialization=False,  # the weights come from the checkpoint
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


def build_gpt_model(hf_config: Any, *, tensor_parallel: int, dtype: torch.dtype, device: torch.device):
    """An uninitialised GPTModel of ``hf_config``'s shape with tree core attention, this rank's
    tensor-parallel shards only (``MegatronBackend.open`` fills it from ``megatron_weights.to_megatron``)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    refuse_unsupported(hf_config, tensor_parallel=tensor_parallel)
    config = transformer_config(hf_config, tensor_parallel=tensor_parallel, dtype=dtype, cpu=device.type == "cpu")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = TreeCoreAttention
    rope = getattr(hf_config, "rope_parameters", None) or {}
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=padded_vocab(hf_config, tensor_parallel),
                     max_sequence_length=hf_config.max_position_embeddings, position_embedding_type="rope",
                     rotary_base=rope.get("rope_theta", 10000.0),
                     share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings))
    # The local spec's norms are created in float32 whatever params_dtype says: one dtype for all.
    return model.to(device=device, dtype=dtype).train()


class TreeCoreAttention(torch.nn.Module):
    """Megatron's core-attention slot filled with arborl's tree attention.

    Megatron hands it query [N, 1, heads, dim] and key/value [N, 1, kv_heads, dim] of this rank's
    heads (rotary already applied) and wants [N, 1, heads * dim]; the mask is the batch's
    :class:`TreeAttentionMask`. The scale is megatron's (``softmax_scale`` or dim^-1/2, as in
    Hugging Face's Llama and Qwen2)."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: Any = None):
        super().__init__()
        self.scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: TreeAttentionMask, attn_mask_type: Any = None, attention_bias: Any = None,
                packed_seq_params: Any = None) -> torch.Tensor:
        if not isinstance(attention_mask, TreeAttentionMask):
            raise TypeError("tree core attention runs only under megatron_model.packed_logprobs_and_entropy")
        attend = tree_attention_function(attention_mask.implementation)
        # [N, 1, h, d] -> [1, h, N, d] (the layout of transformers' attention functions)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out, _ = attend(None, q, k, v, None, scaling=self.scale, tree=attention_mask.tree)
        tokens, _, heads, dim = query.shape
        return out.reshape(tokens, 1, heads * dim)  # [1, N, h, d] -> [N, 1, h*d]


class _GatherVocabShards(torch.autograd.Function):
    """The whole LM head from each tensor-parallel rank's vocabulary rows; the backward keeps this
    rank's rows of the gradient. (Megatron's own gather asks torch.cuda for the device, so it
    cannot run on the CPU; the product runs the same code on both.)"""

    @staticmethod
    def forward(ctx: Any, shard: torch.Tensor, group: Any) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.rows, ctx.rank = shard.shape[0], rank
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Every rank computed the same gradient of the whole head (the hidden states are
        # replicated across the group), so each keeps its rows: no reduction.
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows], None


def head_weight(model: Any, tp_group: Any, vocab_size: int) -> torch.Tensor:
    """The whole LM head [vocab, H] (tied: the embedding), without the padding rows."""
    shard = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
        else model.output_layer.weight
    whole = shard if dist.get_world_size(tp_group) == 1 else _GatherVocabShards.apply(shard, tp_group)
    return whole[:vocab_size]


def rotary_by_depth(model: Any, position_ids: torch.Tensor) -> torch.Tensor:
    """Rotary angles [N, 1, 1, dim] for tokens at the given depths (GPTModel's own would use 0..N-1)."""
    inv_freq = model.rotary_pos_emb.inv_freq
    freqs = position_ids.to(inv_freq.device, torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def packed_logprobs_and_entropy(model: Any, batch: PackedBatch, *, attention: str, tp_group: Any,
                                vocab_size: int, at: torch.Tensor | None = None, chunk_size: int = 1024
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``learner.tree_forward.packed_logprobs_and_entropy``, on a megatron GPTModel: each token's
    logprob given its path and its distribution's entropy (NaN at roots), [N] or [len(at)]."""
    device = model.embedding.word_embeddings.weight.device
    ids, positions = batch.input_ids.to(device), batch.position_ids.to(device)
    hidden = model.embedding(input_ids=ids[None], position_ids=positions[None])  # [N, 1, H]
    mask = TreeAttentionMask(TreeMask(batch.end.to(device)), attention)
    hidden = model.decoder(hidden_states=hidden, attention_mask=mask,
                           rotary_pos_emb=rotary_by_depth(model, positions))[:, 0]  # final norm included
    parent = batch.parent.to(device)
    if at is not None:
        at = at.to(device)
        parent, ids = parent[at], ids[at]
    head = head_weight(model, tp_group, vocab_size)
    logp, entropy = token_logprob_and_entropy(hidden[parent.clamp(min=0)], head, ids, chunk_size=chunk_size)
    root = parent < 0
    nan = torch.full_like(logp, float("nan"))
    return torch.where(root, nan, logp), torch.where(root, nan, entropy)
