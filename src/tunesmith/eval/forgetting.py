"""Forgetting: how far a fine-tuned model drifted from its base on general inputs, measured without benchmarks.

Three measures over data shipped in `tunesmith/eval/data/`:
- drift: mean KL(base || tuned) of next-token distributions over every position of the chat-rendered general
  prompts, token-weighted: KL = sum_pos sum_v p_b(v) (log p_b(v) - log p_t(v)) / n_positions.
- probes: multiple-choice items scored by log-likelihood ranking of the choices (per-character log-likelihood
  of the choice as the assistant reply, to reduce the bias toward short choices), short-answer items by greedy
  generation; accuracy for base and tuned, retention = tuned / base.
- perplexity: exp(mean next-token NLL) on general English prose, in non-overlapping windows.

The base side: a separate base model when given; else, for a peft model, the same model inside
`model.disable_adapter()` (no second copy in memory).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import cache
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.errors import UsageError
from tunesmith.eval.generate import eval_mode, generate_batch, render_prompts
from tunesmith.eval.metrics import squad_tokens
from tunesmith.models.tokens import pad_token_id

SHORT_ANSWER_SUFFIX = "\nAnswer with just the answer."
MC_SUFFIX = ""


# --------------------------------------------------------------------------------------------- data
def _data_text(name: str) -> str:
    return resources.files("tunesmith.eval").joinpath("data", name).read_text(encoding="utf-8")


@cache
def _jsonl(name: str) -> tuple[dict[str, Any], ...]:
    rows = []
    for number, line in enumerate(_data_text(name).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"tunesmith/eval/data/{name}:{number}: not valid JSON: {exc.msg}") from exc
    return tuple(rows)


def load_general_prompts(limit: int | None = None) -> list[str]:
    """The shipped general prompts (many topics), in a fixed interleaved order so any prefix spans topics."""
    rows = list(_jsonl("general_prompts.jsonl"))
    return [r["prompt"] for r in rows[:limit]]


def load_probes(limit: int | None = None, kinds: tuple[str, ...] = ("mc", "short")) -> list[dict[str, Any]]:
    """Probe items: {"id", "kind": "mc"|"short", "category", "question", "choices"+"answer" (index) | "answers"}."""
    rows = [dict(r) for r in _jsonl("probes.jsonl") if r["kind"] in kinds]
    return rows[:limit]


def load_general_text() -> str:
    return _data_text("general_text.txt")


# ------------------------------------------------------------------------------------------- helpers
def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def base_view(model, base_model=None) -> Iterator[Any]:
    """Yield a model that behaves like the base: `base_model` if given, else `model` with its adapter disabled."""
    if base_model is not None:
        yield base_model
        return
    if not hasattr(model, "disable_adapter"):
        raise UsageError(
            "the base model is needed for forgetting measures: pass base_model= (a separate copy) for a model "
            "that is not a peft model"
        )
    with model.disable_adapter():
        yield model


def _padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad: positions of real tokens are unchanged, so no position-id bookkeeping is needed."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _log_probs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, vocab) next-token log-probabilities in fp32."""
    device = _device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    # prompt tuning prepends virtual tokens and returns their logits too; keep the positions of `ids`
    logits = logits[:, -ids.shape[1] :]
    return F.log_softmax(logits.float(), dim=-1)


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _sorted_batches(sequences: list[list[int]], size: int) -> Iterator[list[int]]:
    """Index batches of similar-length sequences (less padding)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    yield from _batches(order, size)


# --------------------------------------------------------------------------------------------- drift
@torch.inference_mode()
def kl_drift(tuned, tokenizer, prompts: list[str], base_model=None, batch_size: int = 8) -> dict[str, float]:
    """Exact mean KL(base || tuned) over all prompt positions (both models live). Returns {"kl", "positions"}."""
    sequences = render_prompts(tokenizer, [[{"role": "user", "content": p}] for p in prompts])
    total, positions = 0.0, 0
    with eval_mode(tuned):
        for index in _sorted_batches(sequences, batch_size):
            ids, mask = _padded([sequences[i] for i in index], pad_token_id(tokenizer))
            tuned_lp = _log_probs(tuned, ids, mask)
            with base_view(tuned, base_model) as base, eval_mode(base):
                base_lp = _log_probs(base, ids, mask)
            kl = (base_lp.exp() * (base_lp - tuned_lp)).sum(-1)  # (batch, seq)
            weights = mask.to(kl.device).float()
            total += float((kl * weights).sum())
            positions += int(weights.sum())
    return {"kl": total / max(1, positions), "positions": positions}


@torch.inference_mode()
def reference_distributions(model, tokenizer, prompts: list[str], top_k: int = 256,
                            batch_size: int = 8) -> dict[str, Any]:
    """Cache the base model's next-token distributions compactly: per position its top-k token ids and
    log-probabilities plus the log of the remaining mass (all other tokens merged into one bucket)."""
    sequences = render_prompts(tokenizer, [[{"role": "user", "content": p}] for p in prompts])
    cached: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = [None] * len(sequences)  # type: ignore[list-item]
    with eval_mode(model):
        for index in _sorted_batches(sequences, batch_size):
            ids, mask = _padded([sequences[i] for i in index], pad_token_id(tokenizer))
            log_probs = _log_probs(model, ids, mask)
            k = min(top_k, log_probs.shape[-1])
            top_lp, top_ids = log_probs.topk(k, dim=-1)  # (batch, seq, k)
            rest = log_probs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)  # (batch, seq)
            for row, i in enumerate(index):
                n = len(sequences[i])
                cached[i] = (top_ids[row, :n].cpu(), top_lp[row, :n].cpu(), rest[row, :n].cpu())
    return {"sequences": sequences, "cached": cached, "top_k": top_k}


def _coarse_kl(base_top: torch.Tensor, base_rest: torch.Tensor, tuned_top: torch.Tensor,
               tuned_rest: torch.Tensor) -> torch.Tensor:
    """KL between distributions coarsened to k+1 buckets; by the data-processing inequality <= the full KL."""
    kl = (base_top.exp() * (base_top - tuned_top)).sum(-1)
    finite = torch.isfinite(base_rest)
    rest_term = torch.where(finite, base_rest.exp() * (base_rest - tuned_rest), torch.zeros_like(base_rest))
    return kl + rest_term


@torch.inference_mode()
def kl_from_reference(model, tokenizer, reference: dict[str, Any], batch_size: int = 8) -> dict[str, float]:
    """Mean coarsened KL(base || model) against a `reference_distributions` cache (no base model needed)."""
    sequences = reference["sequences"]
    total, positions = 0.0, 0
    with eval_mode(model):
        for index in _sorted_batches(sequences, batch_size):
            ids, mask = _padded([sequences[i] for i in index], pad_token_id(tokenizer))
            log_probs = _log_probs(model, ids, mask)
            for row, i in enumerate(index):
                top_ids, top_lp, rest = (t.to(log_probs.device) for t in reference["cached"][i])
                n = top_ids.shape[0]
                tuned_top = log_probs[row, :n].gather(-1, top_ids)
                tuned_rest = log_probs[row, :n].scatter(-1, top_ids, float("-inf")).logsumexp(-1)
                total += float(_coarse_kl(top_lp, rest, tuned_top, tuned_rest).sum())
                positions += n
    return {"kl": total / max(1, positions), "positions": positions}


# -------------------------------------------------------------------------------------------- probes
def _normalise_answer(text: str) -> str:
    return " ".join(squad_tokens(text))


def short_answer_correct(prediction: str, answers: list[str]) -> tuple[bool, bool]:
    """(strict, lenient): strict = the reply's first line equals an accepted answer after SQuAD normalisation;
    lenient = an accepted answer appears as whole words in that first line (small chat models answer in a
    sentence: 'The capital of France is Paris.')."""
    first_line = next((line for line in prediction.strip().splitlines() if line.strip()), "")
    said = _normalise_answer(first_line)
    accepted = [_normalise_answer(a) for a in answers]
    strict = said in accepted
    lenient = strict or any(a and re.search(rf"(?<!\S){re.escape(a)}(?!\S)", said) for a in accepted)
    return strict, bool(lenient)


@torch.inference_mode()
def choice_scores(model, tokenizer, probes: list[dict[str, Any]], batch_size: int = 16) -> list[list[float]]:
    """Per probe, per choice: mean log-likelihood per character of the choice as the assistant's reply.

    score(c) = sum_t log p(c_t | prompt, c_<t) / len(c in characters)
    """
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": p["question"] + MC_SUFFIX}] for p in probes])
    pairs: list[tuple[int, int, list[int], int]] = []  # (probe, choice, full ids, prompt length)
    for i, (probe, prompt) in enumerate(zip(probes, prompts, strict=True)):
        for j, choice in enumerate(probe["choices"]):
            choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            pairs.append((i, j, prompt + choice_ids, len(prompt)))
    scores = [[0.0] * len(p["choices"]) for p in probes]
    with eval_mode(model):
        for index in _sorted_batches([p[2] for p in pairs], batch_size):
            ids, mask = _padded([pairs[k][2] for k in index], pad_token_id(tokenizer))
            log_probs = _log_probs(model, ids, mask)
            for row, k in enumerate(index):
                i, j, full, start = pairs[k]
                targets = torch.tensor(full[start:], device=log_probs.device)
                # the token at position t is predicted by the logits at t-1
                picked = log_probs[row, start - 1 : len(full) - 1].gather(-1, targets[:, None]).sum()
                scores[i][j] = float(picked) / max(1, len(probes[i]["choices"][j]))
    return scores


def probe_accuracy(model, tokenizer, probes: list[dict[str, Any]], batch_size: int = 16,
                   max_new_tokens: int = 24) -> dict[str, Any]:
    """Accuracy on probes: MC by log-likelihood ranking, short answers by greedy generation (lenient match).

    Returns {"accuracy", "mc_accuracy", "short_accuracy", "short_strict_accuracy", "n", "by_category", "items"}.
    """
    mc = [p for p in probes if p["kind"] == "mc"]
    short = [p for p in probes if p["kind"] == "short"]
    items: list[dict[str, Any]] = []
    if mc:
        for probe, scores in zip(mc, choice_scores(model, tokenizer, mc, batch_size), strict=True):
            chosen = max(range(len(scores)), key=scores.__getitem__)
            items.append({"id": probe["id"], "category": probe["category"], "kind": "mc",
                          "correct": chosen == probe["answer"], "chosen": chosen})
    if short:
        with eval_mode(model):
            replies = generate_batch(model, tokenizer,
                                     [[{"role": "user", "content": p["question"] + SHORT_ANSWER_SUFFIX}] for p in short],
                                     max_new_tokens=max_new_tokens, batch_size=batch_size)
        for probe, reply in zip(short, replies, strict=True):
            strict, lenient = short_answer_correct(reply, probe["answers"])
            items.append({"id": probe["id"], "category": probe["category"], "kind": "short", "correct": lenient,
                          "strict": strict, "reply": reply})

    def share(rows: list[dict[str, Any]], key: str = "correct") -> float | None:
        return sum(bool(r[key]) for r in rows) / len(rows) if rows else None

    categories = sorted({r["category"] for r in items})
    return {
        "n": len(items),
        "accuracy": share(items),
        "mc_accuracy": share([r for r in items if r["kind"] == "mc"]),
        "short_accuracy": share([r for r in items if r["kind"] == "short"]),
        "short_strict_accuracy": share([r for r in items if r["kind"] == "short"], "strict"),
        "by_category": {c: share([r for r in items if r["category"] == c]) for c in categories},
        "items": items,
    }


def retention(tuned_score: float | None, base_score: float | None) -> float | None:
    """tuned / base; None when the base scores 0 (nothing to retain) or a score is missing."""
    if tuned_score is None or not base_score:
        return None
    return tuned_score / base_score


# ---------------------------------------------------------------------------------------- perplexity
@torch.inference_mode()
def perplexity(model, tokenizer, text: str, window: int = 256, max_tokens: int | None = None,
               batch_size: int = 4) -> dict[str, float]:
    """exp(mean NLL) over the text cut into non-overlapping windows (each window's first token is context only)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    nll, count = 0.0, 0
    with eval_mode(model):
        for chunk in _batches(windows, batch_size):
            batch, mask = _padded(chunk, pad_token_id(tokenizer))
            log_probs = _log_probs(model, batch, mask)[:, :-1]
            targets = batch[:, 1:].to(log_probs.device)
            valid = mask[:, 1:].to(log_probs.device).bool()
            picked = log_probs.gather(-1, targets[..., None]).squeeze(-1)
            nll -= float(picked[valid].sum())
            count += int(valid.sum())
    mean = nll / max(1, count)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count}


# ------------------------------------------------------------------------------------------ together
def measure_forgetting(tuned, tokenizer, base_model=None, max_prompts: int | None = None,
                       max_probes: int | None = None, max_text_tokens: int | None = 4096,
                       batch_size: int = 8, log=print) -> dict[str, Any]:
    """All three measures, base vs tuned. For a peft model without `base_model`, the base is the same model
    with its adapter disabled. `max_text_tokens` caps the perplexity text (the shipped text is ~2,500 tokens
    for a 49k-vocabulary BPE tokenizer, so the default cap only bites byte-level test tokenizers)."""
    prompts = load_general_prompts(max_prompts)
    probes = load_probes(max_probes)
    text = load_general_text()
    log(f"forgetting: KL drift on {len(prompts)} prompts, {len(probes)} probes, perplexity on general text")
    drift = kl_drift(tuned, tokenizer, prompts, base_model=base_model, batch_size=batch_size)
    tuned_probes = probe_accuracy(tuned, tokenizer, probes, batch_size=batch_size)
    tuned_ppl = perplexity(tuned, tokenizer, text, max_tokens=max_text_tokens)
    with base_view(tuned, base_model) as base:
        base_probes = probe_accuracy(base, tokenizer, probes, batch_size=batch_size)
        base_ppl = perplexity(base, tokenizer, text, max_tokens=max_text_tokens)
    return {
        "kl_drift": drift["kl"],
        "kl_positions": drift["positions"],
        "prompts": len(prompts),
        "probes": {"base": base_probes, "tuned": tuned_probes},
        "probe_accuracy": {"base": base_probes["accuracy"], "tuned": tuned_probes["accuracy"]},
        "probe_retention": retention(tuned_probes["accuracy"], base_probes["accuracy"]),
        "perplexity": {"base": base_ppl["perplexity"], "tuned": tuned_ppl["perplexity"], "tokens": tuned_ppl["tokens"]},
        "perplexity_ratio": tuned_ppl["perplexity"] / base_ppl["perplexity"],
    }


# ------------------------------------------------------------------------------------------ callback
class ForgettingCallback:
    """Cheap forgetting measures at every evaluation of a training run (see train/callbacks.py for the protocol).

    At train begin: cache the base model's top-k next-token distributions on `forgetting_max_prompts` general
    prompts and its multiple-choice probe accuracy (log-likelihood only: no generation, so it stays cheap).
    At each evaluation: coarsened KL drift against the cache, probe accuracy and retention; stops the run when
    retention falls below `retention_threshold`.
    """

    def __init__(self, eval_config=None, max_prompts: int | None = None, max_probes: int | None = None,
                 retention_threshold: float | None = None, top_k: int = 256, batch_size: int = 8):
        self.max_prompts = max_prompts or (eval_config.forgetting_max_prompts if eval_config is not None else 64)
        self.max_probes = max_probes or self.max_prompts
        self.retention_threshold = retention_threshold if retention_threshold is not None else (
            eval_config.retention_threshold if eval_config is not None else None)
        self.top_k, self.batch_size = top_k, batch_size
        self.reference: dict[str, Any] | None = None
        self.base_probe_accuracy: float | None = None
        self.probes = load_probes(self.max_probes, kinds=("mc",))

    def _base_context(self, model):
        # prompt-learning methods start from random virtual tokens; their base is the model without them
        config = getattr(model, "peft_config", None)
        if isinstance(config, dict) and any(getattr(c, "is_prompt_learning", False) for c in config.values()):
            return model.disable_adapter()
        return nullcontext()

    def on_train_begin(self, state, model, tokenizer) -> None:
        prompts = load_general_prompts(self.max_prompts)
        with self._base_context(model):
            self.reference = reference_distributions(model, tokenizer, prompts, self.top_k, self.batch_size)
            self.base_probe_accuracy = probe_accuracy(model, tokenizer, self.probes, self.batch_size)["accuracy"]

    def on_evaluate(self, state, model, tokenizer) -> dict[str, float]:
        if self.reference is None:
            self.on_train_begin(state, model, tokenizer)
        drift = kl_from_reference(model, tokenizer, self.reference, self.batch_size)
        accuracy = probe_accuracy(model, tokenizer, self.probes, self.batch_size)["accuracy"]
        kept = retention(accuracy, self.base_probe_accuracy)
        measures = {"kl_drift": drift["kl"], "probe_accuracy": accuracy, "base_probe_accuracy": self.base_probe_accuracy}
        if kept is not None:
            measures["probe_retention"] = kept
            if self.retention_threshold is not None and kept < self.retention_threshold:
                state.should_stop = True
                state.stop_reason = (f"stopped early at step {state.step}: probe retention {kept:.3f} fell below "
                                     f"eval.retention_threshold={self.retention_threshold}")
        return measures
