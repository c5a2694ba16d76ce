"""Tiny random-weight models and a byte-level tokenizer, built from a config, for tests and quick benchmarks.

No hub is reachable here, so the tokenizer is built with the `tokenizers` library: 256 byte tokens plus the
ChatML special tokens, with a ChatML chat template. Models are saved to a folder so that tests exercise the same
path-loading code that users hit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from tunesmith.models.load import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

ARCHITECTURES = {
    # Llama: grouped-query attention (4 query heads, 2 key/value heads), tied embeddings like SmolLM2.
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    # Qwen2: biases on q/k/v, untied head: a second architecture with different module shapes.
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
    ),
}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {bytes_char: i for i, bytes_char in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[0]))
    vocab = {token: i for i, token in enumerate(vocab)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int | None = None):
    tokenizer = build_tiny_tokenizer()
    params = dict(ARCHITECTURES[arch])
    model_type = params.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size or len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **params,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def save_tiny_model(directory: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    directory = Path(directory)
    model, tokenizer = build_tiny_model(arch, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
