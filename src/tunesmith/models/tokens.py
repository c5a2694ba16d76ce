"""The one eos/pad discovery: which token ids end an assistant turn, and which id pads a batch.

Shared by generation, the forgetting measures and (for its owner to adopt) the serving engine, so that every
path stops on the same tokens and pads the same way.
"""

from __future__ import annotations

from tunesmith.errors import UsageError

# End-of-turn markers of common chat templates; whichever the tokenizer knows as a special token stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos, the model's configured eos, end-of-turn markers."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab and token in tokenizer.all_special_tokens:
            ids.add(int(vocab[token]))
    return sorted(ids)


def pad_token_id(tokenizer, stops: list[int] | None = None) -> int:
    """The id that fills padded positions (always masked out, so any id works; this one is predictable):
    the tokenizer's pad token, else its eos, else the first stop id."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    if stops:
        return int(stops[0])
    raise UsageError("the tokenizer has no pad, eos or end-of-turn token to pad batches with")
