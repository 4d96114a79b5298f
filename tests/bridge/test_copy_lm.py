import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from pix2cap.bridge.copy_lm import CopyGPT2Config, CopyGPT2LMHeadModel

VOCAB = 40
PAD, BOS, SEP = 0, 1, 2


def _config(**overrides) -> CopyGPT2Config:
    kwargs = dict(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=BOS, eos_token_id=SEP, pad_token_id=PAD,
    )
    kwargs.update(overrides)
    return CopyGPT2Config(**kwargs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CopyGPT2LMHeadModel(_config()).eval()


def test_logits_are_a_normalised_log_distribution(model):
    ids = torch.randint(3, VOCAB, (2, 9))
    log_probs = model(ids).logits
    assert log_probs.shape == (2, 9, VOCAB)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 9))


def test_pointer_alone_puts_mass_only_on_earlier_tokens():
    torch.manual_seed(0)
    model = CopyGPT2LMHeadModel(_config()).eval()
    with torch.no_grad():
        model.copy_gate.bias.fill_(-60.0)  # gate ~ 0: the vocabulary head is switched off
    ids = torch.tensor([[5, 7, 7, 9]])
    with torch.no_grad():
        probs = model(ids).logits.exp()[0]
    # Position 0 can copy only token 5; position 3 only tokens 5, 7, 9.
    assert probs[0, 5] == pytest.approx(1.0, abs=1e-5)
    assert probs[3, [5, 7, 9]].sum() == pytest.approx(1.0, abs=1e-5)
    # Position 2 sees "7" twice: its mass on 7 is the sum of both pointer weights.
    with torch.no_grad():
        hidden = model.transformer(ids).last_hidden_state[0, :3]
        weights = torch.softmax(
            model.copy_query(hidden[2]) @ model.copy_key(hidden).T / 32**0.5, dim=-1
        )
    assert probs[2, 7].item() == pytest.approx((weights[1] + weights[2]).item(), abs=1e-5)
    assert probs[2, 5].item() == pytest.approx(weights[0].item(), abs=1e-5)


def test_cached_generation_matches_full_forward(model):
    prompt = torch.tensor([[BOS, 4, 11, 17, 4, 23, SEP]])
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
        pad_token_id=PAD, eos_token_id=None,
    )
    assert out.shape[1] == prompt.shape[1] + 8
    # Greedy with the pointer cache = argmax of an uncached forward over the whole sequence.
    full = model(out, use_cache=False).logits
    new = out[0, prompt.shape[1]:]
    torch.testing.assert_close(full[0, prompt.shape[1] - 1 : -1].argmax(-1), new)


def test_left_padding_does_not_change_generation(model):
    prompt = torch.tensor([[BOS, 6, 13, 29, SEP]])
    padded = torch.cat([torch.full((1, 3), PAD), prompt], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(prompt)], 1)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    batched = model.generate(padded, attention_mask=mask, **kwargs)
    torch.testing.assert_close(batched[0, 3:], plain[0])


def test_cached_pointer_keeps_large_token_ids_exact_in_bfloat16():
    torch.manual_seed(0)
    model = CopyGPT2LMHeadModel(_config(vocab_size=5000)).eval().to(torch.bfloat16)
    with torch.no_grad():
        model.copy_gate.bias.fill_(-60.0)  # copy only
    prompt = torch.tensor([[4001, 4003, 4999]])  # bfloat16 cannot hold these ids exactly
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
        pad_token_id=PAD, eos_token_id=None,
    )
    assert set(out[0, 3:].tolist()) <= {4001, 4003, 4999}


def test_needs_input_ids(model):
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=torch.zeros(1, 3, 32))


def test_saves_and_loads_through_auto_classes(model, tmp_path):
    model.save_pretrained(str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert isinstance(loaded, CopyGPT2LMHeadModel)
    ids = torch.randint(3, VOCAB, (1, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def _copy_task_batch(generator: torch.Generator, batch: int = 16, length: int = 6):
    """``[BOS] a b c ... [SEP] a b c ...``: the second half repeats the first."""
    source = torch.randint(3, VOCAB, (batch, length), generator=generator)
    ids = torch.cat([torch.full((batch, 1), BOS), source, torch.full((batch, 1), SEP), source], 1)
    labels = ids.clone()
    labels[:, : length + 2] = -100
    return ids, labels


def _train_on_copy_task(model, steps: int = 60) -> float:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids, labels = _copy_task_batch(generator)
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        ids, labels = _copy_task_batch(torch.Generator().manual_seed(1), batch=64)
        return model(ids, labels=labels).loss.item()


def test_pointer_head_learns_to_copy_where_plain_gpt2_does_not():
    """On random tokens to repeat, the vocabulary head has nothing to learn but copying; the
    pointer learns it within 60 steps, while the same GPT-2 without it is still far off
    (chance: log 40 = 3.7 nats; measured 0.36 against 2.49)."""
    settings = dict(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=BOS, eos_token_id=SEP, pad_token_id=PAD,
    )
    torch.manual_seed(0)
    copy_loss = _train_on_copy_task(CopyGPT2LMHeadModel(CopyGPT2Config(**settings)))
    torch.manual_seed(0)
    plain_loss = _train_on_copy_task(GPT2LMHeadModel(GPT2Config(**settings)))
    assert copy_loss < 0.6
    assert plain_loss > 4 * copy_loss
