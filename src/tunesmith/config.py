"""Typed run configuration: one YAML file, validated at load time.

Sections: model, data, method, train, eval, output. Every field carries a one-line help (its `description`).
An unknown or mistyped key is an error naming its dotted path and the closest valid key; `--set a.b=c`
overrides any key; `resolved_yaml()` is what a run directory stores.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model

from tunesmith.errors import UsageError


class ConfigError(UsageError):
    """A configuration problem, phrased for a person: the file, the dotted path, what was expected."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    name_or_path: str = Field(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        description="Base model: a local directory, a hub id, or a known id that tunesmith can build locally.",
    )
    gguf_file: str | None = Field(None, description="Load from this GGUF file inside name_or_path (dequantized).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = float32 on CPU, bfloat16 on GPUs that support it."
    )
    trust_remote_code: bool = Field(False, description="Allow the model repository's own Python code to run.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; None lets transformers choose."
    )


# ---------------------------------------------------------------------------------------------- data
class TaskDataset(Section):
    """One task of a multi-task run (data.datasets[*])."""

    name: str = Field(..., description="Task name (per-task metrics and manifest counts use it).")
    train: list[str] = Field(default_factory=list, description="Training files of this task.")
    validation: list[str] = Field(default_factory=list, description="Validation files of this task.")
    test: list[str] = Field(default_factory=list, description="Test files of this task (evaluated as its own split).")
    weight: float = Field(1.0, gt=0, description="Relative share of this task in the training mixture.")
    task_prefix: str | None = Field(None, description="Text put before the first user turn, e.g. '[Classify risk]'.")
    system_prompt: str | None = Field(None, description="System prompt added to this task's records that have none.")


# ---------------------------------------------------------------------------------------------- data
class DataConfig(Section):
    train: list[str] = Field(default_factory=list, description="Training files (JSONL/JSON/CSV/Parquet).")
    validation: list[str] = Field(default_factory=list, description="Validation files; empty = split from train.")
    test: list[str] = Field(default_factory=list, description="Test files used by `eval` after training.")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "chatml"] = Field(
        "auto", description="Record format; auto detects it per file."
    )
    validation_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of train held out for validation when no validation file is given."
    )
    max_seq_len: int = Field(512, gt=8, description="Token budget per training sequence.")
    truncation: Literal["error", "truncate", "drop"] = Field(
        "truncate", description="What to do with an example longer than max_seq_len; every case is counted."
    )
    packing: bool = Field(True, description="Pack several examples per sequence (no cross-example attention).")
    system_prompt: str | None = Field(None, description="System prompt added to records that have none.")
    max_train_examples: int | None = Field(None, gt=0, description="Use only the first N training examples.")
    max_validation_examples: int | None = Field(None, gt=0, description="Use only the first N validation examples.")
    prepare: bool = Field(False, description="Run `tunesmith data prepare` (validate, dedup, screen) first.")
    # multi-task (continual helper; recipes/multitask.py, data/mixing.py)
    datasets: list[TaskDataset] = Field(
        default_factory=list, description="Several tasks mixed by weight (instead of train/validation/test)."
    )
    general: list[str] = Field(default_factory=list, description="General-purpose data mixed in as a forgetting guard.")
    general_share: float = Field(0.0, ge=0, lt=1, description="Share of the training mixture drawn from data.general.")
    mix_size: int | None = Field(
        None, gt=0, description="Training records in the mixture (default: the most that needs no repeats)."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Map non-standard fields, e.g. {prompt: question, response: answer}."
    )


# -------------------------------------------------------------------------------------------- method
def _known_method(name: str) -> str:
    from tunesmith.methods.registry import method_names

    if name not in method_names():
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(method_names())}")
    return name


def _method_config_model() -> type[Section]:
    """`method:` assembled from the method registry: `name` plus each method's own options sections, in registry
    order (each options class lives beside its method, e.g. LoraOptions in methods/lora.py). The registry's method
    modules are light (no torch/peft at import), so loading a config stays fast."""
    from tunesmith.methods.registry import all_methods

    fields: dict[str, Any] = {
        "name": (Annotated[str, AfterValidator(_known_method)], Field("lora", description="Fine-tuning method.")),
    }
    for method in all_methods():
        for section in method.options:
            fields[section.key] = (section.cls, Field(default_factory=section.cls, description=section.description))
    model = create_model("MethodConfig", __base__=Section, __module__=__name__, **fields)
    model.__doc__ = "The fine-tuning method and every method's options (see tunesmith.methods.registry)."
    return model


MethodConfig = _method_config_model()


# --------------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warm-up.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a share of the peak rate.")
    batch_size: int = Field(4, gt=0, description="Sequences per micro-batch (per process).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, description="AdamW beta2.")
    max_grad_norm: float | None = Field(1.0, description="Clip the gradient norm; None disables clipping.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field("adamw", description="Optimizer.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 only where the hardware runs it natively, else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (None = once per epoch end).")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps (None = at evaluations).")
    logging_steps: int = Field(1, gt=0, description="Log the training loss every N steps.")
    save_total_limit: int = Field(2, gt=0, description="Keep at most N recent checkpoints (plus the best).")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evaluations without a better eval loss."
    )
    early_stopping_threshold: float = Field(0.0, ge=0, description="Smallest eval-loss drop that counts as better.")
    load_best_at_end: bool = Field(True, description="Finish with the checkpoint of lowest eval loss.")
    seed: int = Field(0, description="Seed for data order, initialisation and dropout.")
    show_progress: bool = Field(True, description="Show a progress bar.")
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="fsdp = shard parameters, gradients and optimizer state over the processes (FSDP2, one "
        "unit per decoder layer); `accelerate launch` with an FSDP config turns it on too."
    )
    fsdp_cpu_offload: bool = Field(False, description="With sharding: keep shards, gradients and optimizer state in CPU RAM.")


# ---------------------------------------------------------------------------------------------- eval
class EvalConfig(Section):
    metrics: list[str] = Field(
        default_factory=lambda: ["exact_match", "json_valid", "field_f1", "hallucination_rate"],
        description="Task metrics computed on generated outputs.",
    )
    metric_options: dict[str, Any] = Field(
        default_factory=dict, description="Options passed to the metrics, e.g. {closed_fields: [clause_type]}."
    )
    max_new_tokens: int = Field(128, gt=0, description="Generation budget per example.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation batch.")
    max_examples: int | None = Field(None, gt=0, description="Evaluate only the first N examples (named in output).")
    compare_base: bool = Field(False, description="Also evaluate the base model (before/after table).")
    splits: dict[str, list[str]] = Field(
        default_factory=dict, description="Extra named evaluation sets, e.g. {ood: [ood.jsonl]}."
    )
    forgetting: bool = Field(False, description="Measure drift/retention against the base model at each evaluation.")
    forgetting_max_prompts: int = Field(64, gt=0, description="General prompts used by the cheap forgetting measures.")
    retention_threshold: float | None = Field(
        None, gt=0, le=1, description="Stop training when probe retention (tuned/base) falls below this."
    )


# ---------------------------------------------------------------------------------------- continual
class ContinualConfig(Section):
    continue_from: str | None = Field(
        None, description="Start from this run's weights: NAME@VERSION, alias or run directory (--continue-from)."
    )
    progressive: bool = Field(
        False, description="LoRA: train a new adapter on top of the parent's frozen adapters instead of continuing it."
    )
    replay_size: int = Field(0, ge=0, description="Records kept in the replay buffer (replay_buffer.jsonl) for later runs.")
    replay_share: float = Field(0.0, ge=0, lt=1, description="Share of the training mixture replayed from the parent.")
    replay_strategy: Literal["reservoir", "stratified"] = Field(
        "reservoir", description="Buffer sampling: reservoir (uniform) or stratified by diversity clusters."
    )
    ewc_lambda: float = Field(0.0, ge=0, description="EWC strength; 0 = off. Needs the parent's ewc.safetensors.")
    ewc_examples: int = Field(64, gt=0, description="Training examples for the empirical Fisher at the end of a run.")
    ewc_online: bool = Field(True, description="Online EWC (one summed Fisher); false = one penalty per earlier task.")
    ewc_gamma: float = Field(1.0, gt=0, le=1, description="Online EWC decay of earlier Fishers.")
    store_fisher: bool = Field(False, description="Estimate and store the Fisher even when this run uses no EWC.")
    orthogonal_lambda: float = Field(
        0.0, ge=0, description="O-LoRA: with progressive, penalise lambda * sum ||A_frozen A_new^T||^2 (0 = off)."
    )


# -------------------------------------------------------------------------------------------- output
class OutputConfig(Section):
    dir: str = Field("runs", description="Parent folder of run directories.")
    name: str | None = Field(None, description="Run name (default: derived from the config file name).")
    overwrite: bool = Field(False, description="Replace an existing run directory of the same name.")
    register_run: bool = Field(True, description="Record the run in the registry when training finishes.")
    registry_url: str | None = Field(None, description="Registry location (SQLAlchemy URL or folder).")


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Fine-tuning method.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where results go.")
    continual: ContinualConfig = Field(default_factory=ContinualConfig, description="Continual fine-tuning.")


# ------------------------------------------------------------------------------------------- loading
def _field_names(model_cls: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """Valid keys at `path` (the parent of an offending key), walking nested section models."""
    cls: Any = model_cls
    for part in path:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}).keys())


def _explain(error: ValidationError, source: str) -> ConfigError:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc)
        if item["type"] == "extra_forbidden":
            valid = _field_names(RunConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f" — did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            lines.append(f"  {dotted}: unknown key{hint} (valid here: {', '.join(valid)})")
        else:
            got = item.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {dotted}: {item['msg']}{got_text}")
    return ConfigError("\n".join(lines))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` → (['a', 'b'], value parsed as YAML, so numbers, booleans and lists work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-4")
    key, _, raw = text.partition("=")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _looks_like_float(raw):
        value = float(raw)  # YAML 1.1 reads '1e-4' as a string
    return key.strip().split("."), value


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{key}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def _fix_yaml_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node) and any(c in node for c in "eE") and node[0] in "0123456789.-+":
        return float(node)
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `--set` overrides, validate. Relative data paths resolve against the file."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: config file not found") from exc
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, method, ...)")
        data = loaded
    data = apply_overrides(_fix_yaml_floats(data), overrides or [])
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source) from None
    if path is not None:
        _resolve_paths(config, Path(path).resolve().parent)
        if config.output.name is None:
            config.output.name = Path(path).stem
    return config


def _resolve_paths(config: RunConfig, base: Path) -> None:
    def fix(paths: list[str]) -> list[str]:
        return [p if Path(p).is_absolute() or not (base / p).exists() else str((base / p).resolve()) for p in paths]

    config.data.train = fix(config.data.train)
    config.data.validation = fix(config.data.validation)
    config.data.test = fix(config.data.test)
    config.eval.splits = {k: fix(v) for k, v in config.eval.splits.items()}
    config.data.general = fix(config.data.general)
    for task in config.data.datasets:
        task.train, task.validation, task.test = fix(task.train), fix(task.validation), fix(task.test)


def resolved_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_help(cls: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """One line per key: dotted path, default and help (printed by `tunesmith config --help-keys`)."""
    lines = []
    for name, field in cls.model_fields.items():
        dotted = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(config_help(ann, dotted + "."))
        else:
            default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
            lines.append(f"{dotted} = {default!r}  # {field.description}")
    return lines
