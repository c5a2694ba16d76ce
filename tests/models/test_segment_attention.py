"""Per-example attention over packed rows (models/attention.py) against two independent computations: SDPA with
the 4-D block-diagonal mask of data/pack.py, and every example run alone. fp32, tolerances stated per check."""

import pytest
import torch

from tunesmith.data.pack import Pack, collate
from tunesmith.data.render import Example
from tunesmith.models.attention import (
    SEGMENT_ATTENTION,
    segment_attention,
    segment_attention_applies,
)

VOCAB = 97
LENGTHS = [[7, 12, 5], [24], [3, 9]]  # rows of examples; the last row is padded to 24


def _model(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, num_hidden_layers=2, vocab_size=VOCAB,
                                  attn_implementation="sdpa")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _packs(seed: int = 1) -> list[Pack]:
    g = torch.Generator().manual_seed(seed)
    packs = []
    for row in LENGTHS:
        examples = []
        for n in row:
            ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
            examples.append(Example(ids, [-100] * (n // 2) + ids[n // 2:]))
        packs.append(Pack(examples))
    return packs


def _block_logits(model, packs):
    batch = collate(packs, 0, block_mask=True)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], use_cache=False).logits


def _segment_logits(model, packs):
    batch = collate(packs, 0, block_mask=False, segments=True)
    with segment_attention(model):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], segment_lengths=batch["segment_lengths"],
                     use_cache=False).logits, batch


def test_collate_gives_segment_lengths_and_no_block_mask():
    batch = collate(_packs(), 0, block_mask=False, segments=True)
    assert batch["segment_lengths"] == ((7, 12, 5), (24,), (3, 9))
    assert batch["attention_mask"].shape == (3, 24)  # 2-D padding mask only
    assert batch["attention_mask"][2].sum() == 12
    assert batch["position_ids"][0, :8].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    with pytest.raises(ValueError, match="replaces the block mask"):
        collate(_packs(), 0, block_mask=True, segments=True)


def test_logits_match_the_block_mask_and_examples_alone():
    """Real positions: per-example attention == block-diagonal mask (atol 1e-5) == each example alone (1e-5)."""
    model, packs = _model(), _packs()
    with torch.no_grad():
        block = _block_logits(model, packs)
        segments, batch = _segment_logits(model, packs)
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(segments[real], block[real], atol=1e-5, rtol=1e-5)
        for row, pack in enumerate(packs):
            start = 0
            for example in pack.examples:
                n = len(example.input_ids)
                alone = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]
                torch.testing.assert_close(segments[row, start:start + n], alone, atol=1e-5, rtol=1e-5)
                start += n


def test_gradients_match_the_block_mask_with_and_without_checkpointing():
    """Gradients of every weight through a masked loss: per-example attention vs the block mask, relative error
    <= 1e-4 per tensor; also under gradient checkpointing (the recomputed layers see the same segments)."""
    import torch.nn.functional as F

    packs = _packs()
    labels = collate(packs, 0, block_mask=True)["labels"]

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)

    for checkpointing in (False, True):
        grads = []
        for segmented in (False, True):
            model = _model().train()
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if segmented:
                batch = collate(packs, 0, block_mask=False, segments=True)
                with segment_attention(model):
                    loss_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"], segment_lengths=batch["segment_lengths"],
                                  use_cache=False).logits).backward()
            else:
                loss_of(_block_logits(model, packs)).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        for name, reference in grads[0].items():
            error = (grads[1][name] - reference).norm() / reference.norm().clamp_min(1e-12)
            assert error < 1e-4, (checkpointing, name, float(error))


def test_generation_outside_the_trainer_is_unchanged():
    """Left on the segment implementation, a model without segment lengths (generation with a padded batch) runs
    plain SDPA with transformers' own mask: the same tokens as on "sdpa"; the context restores the setting."""
    model = _model()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with segment_attention(model):
        assert model.config._attn_implementation == SEGMENT_ATTENTION
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(got, expected)


def test_trainer_refuses_segment_lengths_without_the_implementation():
    """A batch with segment lengths on a model still on "sdpa" would let examples see each other through the 2-D
    mask: forward_loss raises instead."""
    from tunesmith.methods.base import Method
    from tunesmith.train.loop import forward_loss

    model = _model().train()
    batch = collate(_packs(), 0, block_mask=False, segments=True)
    with pytest.raises(RuntimeError, match="segment lengths"):
        forward_loss(model, Method(), batch, "fp32", torch.device("cpu"))
    with segment_attention(model):
        loss, n = forward_loss(model, Method(), batch, "fp32", torch.device("cpu"))
    block_loss, block_n = forward_loss(model, Method(), collate(_packs(), 0, block_mask=True), "fp32",
                                       torch.device("cpu"))
    assert n == block_n
    torch.testing.assert_close(loss, block_loss, atol=1e-4, rtol=1e-5)


def test_when_the_trainer_uses_it():
    assert segment_attention_applies("cpu", "sdpa", packing=True, virtual_tokens=False)
    assert segment_attention_applies("cpu", None, packing=True, virtual_tokens=False)
    assert not segment_attention_applies("cpu", "sdpa", packing=False, virtual_tokens=False)
    assert not segment_attention_applies("cpu", "sdpa", packing=True, virtual_tokens=True)  # prefix, prompt
    assert not segment_attention_applies("cuda", "sdpa", packing=True, virtual_tokens=False)
    assert not segment_attention_applies("cpu", "eager", packing=True, virtual_tokens=False)
