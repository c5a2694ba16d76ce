"""Run EleutherAI's lm-evaluation-harness tasks (mmlu, hellaswag, gsm8k, humaneval, ...) on a loaded model.

lm-eval is optional and not a dependency of tunesmith: its tasks download their datasets from the Hugging Face
hub (or read them from HF_DATASETS_CACHE), which this environment may not reach. When the harness or a task's
data is missing, `run_lm_eval` raises `LmEvalUnavailable` with what to install or fetch, instead of a stack trace.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from tunesmith.errors import Failure, UsageError

# Tasks users ask for most; any task name the installed harness knows is accepted.
KNOWN_TASKS = ("mmlu", "hellaswag", "gsm8k", "humaneval", "arc_easy", "arc_challenge", "truthfulqa_mc2",
               "winogrande", "piqa", "boolq")


class LmEvalUnavailable(Failure):
    """The harness or a task's data is not available; the message says how to get it."""


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, num_fewshot: int | None = None,
                batch_size: int = 8) -> dict[str, Any]:
    """Evaluate `model` on harness tasks. Returns {task: {metric: value}} from the harness's `results`.

    Raises LmEvalUnavailable when lm-eval is not installed, a task name is unknown to it, or its data cannot be
    loaded (no network and no local copy).
    """
    if not tasks:
        raise UsageError("no lm-eval tasks named; e.g. --lm-eval mmlu,hellaswag")
    if not lm_eval_available():
        raise LmEvalUnavailable(
            f"lm-eval tasks {', '.join(tasks)} need EleutherAI's harness, which is not installed: "
            "`pip install lm-eval` (tunesmith does not depend on it); its datasets come from the Hugging Face hub "
            "or a local HF_DATASETS_CACHE"
        )
    from lm_eval import simple_evaluate  # type: ignore[import-not-found]
    from lm_eval.models.huggingface import HFLM  # type: ignore[import-not-found]

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    except (KeyError, ValueError) as exc:  # the harness reports unknown task names this way
        raise LmEvalUnavailable(f"lm-eval could not set up tasks {', '.join(tasks)}: {exc}") from exc
    except (OSError, ConnectionError) as exc:  # dataset download or cache read failed
        raise LmEvalUnavailable(
            f"lm-eval tasks {', '.join(tasks)}: their data could not be loaded ({exc}); download the datasets "
            "where the hub is reachable and point HF_DATASETS_CACHE at them"
        ) from exc
    results = (output or {}).get("results", {})
    return {task: {k: v for k, v in values.items() if isinstance(v, (int, float))} for task, values in results.items()}
