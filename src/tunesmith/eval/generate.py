"""Batched generation for evaluation: render chat prompts, left-pad, generate with the KV cache, decode.

Semantics (what a test holds the batched path to): for every prompt p,
    generate_batch(model, tok, [p, ...])[i] == generate_batch(model, tok, [p], batch_size=1)[0]
token for token in fp32 under greedy decoding. Left padding keeps every prompt's last token at the same column,
so one `generate` call continues all prompts at once; the attention mask hides the padding and transformers
derives position ids from it (cumsum(mask) - 1), so a padded prompt sees the same positions as an unpadded one.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import GenerationConfig

from tunesmith.errors import UsageError
from tunesmith.models.tokens import pad_token_id, stop_token_ids


def render_prompts(tokenizer, prompts: list[list[dict[str, str]]]) -> list[list[int]]:
    """Chat-template each conversation (no final assistant turn) with the generation prompt; return token ids."""
    rendered = []
    for index, messages in enumerate(prompts):
        if messages and messages[-1].get("role") == "assistant":
            raise ValueError(
                f"prompt {index} ends with an assistant turn; pass the conversation without the turn to generate"
            )
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already holds any BOS the model expects; adding special tokens again would double it.
        rendered.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return rendered


@contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _generation_config(model, tokenizer, max_new_tokens: int, greedy: bool, stops: list[int]) -> GenerationConfig:
    pad = pad_token_id(tokenizer, stops)
    if greedy:
        # A fresh config: a model's sampling defaults (temperature, top_p) must not leak into greedy decoding.
        return GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad, use_cache=True
        )
    base = getattr(model, "generation_config", None)
    config = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    config.update(max_new_tokens=max_new_tokens, do_sample=True, eos_token_id=stops, pad_token_id=pad, use_cache=True)
    return config


def _cut_at_stop(ids: list[int], stops: set[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stops:
            return ids[:position]
    return ids


def generate_token_ids(
    model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int = 128, batch_size: int = 16, greedy: bool = True,
    progress=None,
) -> list[list[int]]:
    """Generate continuations of tokenized prompts; returns the new tokens of each, cut before the first stop token.

    Prompts are sorted by length so each batch pads little, then results are put back in input order.
    `progress(done, total, token, max_new_tokens)`, if given, is called after every decoding step with the
    examples finished so far and the current batch's token count (long evaluations report as they go).
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    stops = stop_token_ids(model, tokenizer)
    if not stops:
        raise UsageError("the tokenizer has no eos token and no known end-of-turn token; cannot tell where to stop")
    config = _generation_config(model, tokenizer, max_new_tokens, greedy, stops)
    pad = config.pad_token_id
    device = _device(model)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[list[int]] = [[] for _ in prompt_ids]
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompt_ids[i]) for i in chunk)
            # input_ids, attention_mask: (batch, width), padding on the left
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids = prompt_ids[i]
                if not ids:
                    raise ValueError(f"prompt {i} rendered to zero tokens")
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
                **_heartbeat(progress, start, len(order), width, max_new_tokens),
            )
            new_tokens = output[:, width:].tolist()  # (batch, generated)
            for row, i in enumerate(chunk):
                results[i] = _cut_at_stop(new_tokens[row], set(stops))
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order), None, max_new_tokens)
    return results


def _heartbeat(progress, done: int, total: int, width: int, max_new_tokens: int) -> dict:
    """generate() kwargs that call `progress` after every decoding step; a stopping criterion that never stops
    (the only per-step hook `generate` offers), so the generated tokens are unchanged."""
    if progress is None:
        return {}
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Heartbeat(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            progress(done, total, input_ids.shape[1] - width, max_new_tokens)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return {"stopping_criteria": StoppingCriteriaList([Heartbeat()])}


def generate_batch(
    model,
    tokenizer,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    greedy: bool = True,
    progress=None,
) -> list[str]:
    """Answer each conversation (given without its final assistant turn); returns the decoded replies in order.

    Works for a plain transformers model and a peft PeftModel (both take keyword `generate` arguments).
    Special tokens are stripped from the replies, and surrounding whitespace is removed.
    """
    if not prompts:
        return []
    prompt_ids = render_prompts(tokenizer, prompts)
    outputs = generate_token_ids(model, tokenizer, prompt_ids, max_new_tokens, batch_size, greedy, progress)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]

