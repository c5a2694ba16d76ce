"""Helpers for tests and benchmarks: random (non-zero) PEFT LoRA adapters for a base model, made with peft itself."""

from __future__ import annotations

from pathlib import Path

import torch


def make_lora_adapter(base_dir: str | Path, out_dir: str | Path, seed: int, r: int = 4, alpha: float = 8,
                      targets: list[str] | str = "all-linear", base_model=None, scale_b: float = 1.0) -> Path:
    """Save a PEFT LoRA adapter whose A and B are both random (init_lora_weights=False), so it differs from base.

    `scale_b` multiplies B, so the adapter visibly changes greedy outputs of a tiny random model.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = base_model if base_model is not None else AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    if scale_b != 1.0:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale_b)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    peft_model.unload() if base_model is not None else None  # give the caller its base back, unwrapped
    return Path(out_dir)


def peft_greedy(base_dir: str | Path, adapter_dir: str | Path | None, prompt_ids: list[int], max_new_tokens: int,
                model=None) -> list[int]:
    """The request run alone: base model (+ the adapter through peft), greedy, eos stripped. The test oracle."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, token in enumerate(out):
        if token in eos:
            return out[:i]
    return out


def expected_table(base_dir: str | Path, adapters: dict[str, Path], prompts: list[list[int]],
                   max_new_tokens: int) -> dict[tuple[str, int], list[int]]:
    """(adapter name or 'base', prompt index) -> peft-alone greedy tokens, loading each adapter once."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    table = {}
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    for i, prompt in enumerate(prompts):
        table[("base", i)] = peft_greedy(base_dir, None, prompt, max_new_tokens, model=base)
    for name, path in adapters.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                          str(path))
        for i, prompt in enumerate(prompts):
            table[(name, i)] = peft_greedy(base_dir, path, prompt, max_new_tokens, model=model)
    return table


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log_path: str | Path, timeout: float = 90.0):
    """Start `tunesmith serve ARGS --port P` as a subprocess on 127.0.0.1 and wait (bounded) for /health.

    Returns (process, base URL). The caller stops it with stop_server(process).
    """
    import os
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it for its whole life
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {Path(log_path).read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not answer /health within {timeout} s")


def stop_server(proc) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)
