"""LoRA through peft (Hu et al., 2021): W x + (alpha / r) * B A x, with A: (r, in), B: (out, r).

B starts at zero, so the first forward equals the base model. rsLoRA scales by alpha / sqrt(r) (Kalajdzievski,
2023); DoRA decomposes W into magnitude and direction (Liu et al., 2024). The saved folder is PEFT's own layout
(adapter_config.json + adapter_model.safetensors), loadable by peft, vLLM and LoRAX.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from tunesmith.atomic import atomic_dir
from tunesmith.config import MethodConfig
from tunesmith.methods.base import Method, MethodError, write_method_file


def lora_config(config: MethodConfig) -> LoraConfig:
    options = config.lora
    return LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        bias=options.bias,
        use_rslora=options.use_rslora,
        use_dora=options.use_dora,
        init_lora_weights="gaussian" if options.init == "gaussian" else True,  # True = Kaiming-uniform A, zero B
        modules_to_save=options.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


class LoraMethod(Method):
    name = "lora"
    can_merge = True

    def apply(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        return get_peft_model(model, lora_config(config))

    def save(self, model: nn.Module, directory: Path, config: MethodConfig, base_model: str) -> None:
        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = base_model  # the id users know, not a local cache path
        with atomic_dir(directory) as tmp:
            # tunesmith never resizes the vocabulary; peft's "auto" would query the hub for the base config to check
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
            write_method_file(tmp, self.name, base_model, config)

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        directory = Path(directory)
        if not (directory / "adapter_model.safetensors").exists():
            pickled = [p.name for p in directory.glob("*.bin")]
            hint = f" (found {pickled[0]}: pickled adapters are refused; convert it to safetensors)" if pickled else ""
            raise MethodError(f"{directory}: no adapter_model.safetensors{hint}")
        model = PeftModel.from_pretrained(base, directory, is_trainable=False)
        model.eval()
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, PeftModel):
            raise MethodError("this model has no LoRA layers to merge (already merged?)")
        with torch.no_grad():
            return model.merge_and_unload(safe_merge=True)


METHOD = LoraMethod()
