"""LoRA training on the tiny random Llama: records, masking, the shared-prefix loss, seeding, base left intact."""
import pytest
import torch

from library_store.expert import parse_site
from library_store.training.train import (IGNORE, TrainConfig, attached, collate, encode, lora_init_state,
                                          prefix_target_loss, prompt_prefix, target_loss, train_expert)
from library_store.training.train import _attach, _detach
from library_store.training.prefix import common_prefix_length
from library_store.tasks import resolve_tasks

TASKS = "builtin:add,reverse_word"  # resolved once by conftest's `tasks`
FAST = dict(steps=3, batch_size=2, progress=False)


@pytest.fixture
def base(tiny_llama):
    return tiny_llama  # the session's twin; conftest fails a test that leaves it changed


def _logits(base):
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    with torch.no_grad():
        return base.model(input_ids=ids).logits


@pytest.mark.slow
def test_train_expert_returns_a_filled_record(base, tasks, trained):
    expert = trained(base, tasks[:1], "add", TrainConfig(**FAST))
    info = expert.info
    assert info.name == "add" and info.kind == "private" and info.tasks == ["add"]
    assert info.rank == 4 and info.alpha == 16 and info.target_modules == sorted(base.targets)
    assert info.train.steps == 3 and info.train.batch_size == 2 and info.train.examples == len(tasks[0].train)
    assert info.train.final_loss is not None and info.train.final_loss > 0 and info.train.seconds >= 0
    sites = expert.factors()
    assert len(sites) == 2 * 4  # 2 layers x q, k, v, o
    for site, (a, b) in sites.items():
        parse_site(site)
        assert a.shape[0] == 4 and b.shape[1] == 4
        assert b.abs().sum() > 0  # B starts at zero: training moved it


@pytest.mark.slow
def test_base_model_is_left_unchanged(base, tasks):
    before = _logits(base)
    flags = {n: p.requires_grad for n, p in base.model.named_parameters()}
    names = {n for n, _ in base.model.named_modules()}
    train_expert(base, tasks, "mix", "private", TrainConfig(**FAST))
    assert torch.equal(_logits(base), before)
    assert {n: p.requires_grad for n, p in base.model.named_parameters()} == flags
    assert {n for n, _ in base.model.named_modules()} == names  # no LoRA module left behind
    assert not base.model.training


@pytest.mark.slow
def test_attached_expert_changes_logits_then_restores(base, tasks, trained):
    expert = trained(base, tasks[:1], "add", TrainConfig(steps=3, batch_size=2, lr=1e-2, progress=False))
    before = _logits(base)
    with attached(base, expert) as model:
        with torch.no_grad():
            during = model(input_ids=torch.tensor([[1, 200, 300, 400, 500]])).logits
    assert not torch.allclose(during, before)
    assert torch.equal(_logits(base), before)


@pytest.mark.slow
def test_loss_goes_down(base, tasks):
    expert = train_expert(base, tasks[:1], "add", "private", TrainConfig(steps=30, batch_size=4, lr=1e-2,
                                                                          dropout=0.0, progress=False))
    first = train_expert(base, tasks[:1], "add", "private", TrainConfig(steps=1, batch_size=4, lr=1e-2,
                                                                         dropout=0.0, progress=False))
    assert expert.info.train.final_loss < first.info.train.final_loss - 0.15


@pytest.mark.slow
def test_training_is_seeded(base, tasks, trained):
    a = trained(base, tasks[:1], "add", TrainConfig(**FAST, seed=3))
    b = train_expert(base, tasks[:1], "b", "private", TrainConfig(**FAST, seed=3))
    c = train_expert(base, tasks[:1], "c", "private", TrainConfig(**FAST, seed=4))
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert not all(torch.equal(a.weights[k], c.weights[k]) for k in a.weights)


@pytest.mark.slow
def test_warmup_experts_share_their_init(base, tasks):
    cfg = TrainConfig(**FAST, init_seed=7)
    e1, init1 = train_expert(base, tasks[:1], "w1", "warmup", cfg, return_init=True)
    e2, init2 = train_expert(base, tasks[1:], "w2", "warmup", TrainConfig(**FAST, init_seed=7, seed=5),
                             return_init=True)
    assert all(torch.equal(init1[k], init2[k]) for k in init1)
    assert all(torch.equal(init1[k], v) for k, v in lora_init_state(base, cfg).items())
    assert e1.info.train.init_seed == 7
    other = lora_init_state(base, TrainConfig(init_seed=8))
    assert not all(torch.equal(init1[k], other[k]) for k in init1)
    a_keys = [k for k in init1 if "lora_A" in k]
    assert all(init1[k].abs().sum() > 0 for k in a_keys)
    assert all(init1[k].abs().sum() == 0 for k in init1 if "lora_B" in k)


def test_encode_masks_the_prompt(base, tasks):
    ex = tasks[0].train[0]
    enc = encode(base, ex, TrainConfig())
    n_prompt = sum(1 for lab in enc.labels if lab == IGNORE)
    target = base.tokenizer(ex.target, add_special_tokens=False).input_ids
    assert enc.labels[n_prompt:] == target + [base.tokenizer.eos_token_id]
    assert enc.ids[n_prompt:] == enc.labels[n_prompt:]
    prompt = base.tokenizer.decode(enc.ids[:n_prompt])
    assert ex.input in prompt and prompt.rstrip().endswith("assistant")


def test_long_prompt_is_cut_from_the_left(base, tasks):
    from library_store.tasks import Example

    enc = encode(base, Example("word " * 200, "7"), TrainConfig(max_len=32))
    assert len(enc.ids) == 32 and enc.labels[-2:] == [base.tokenizer("7", add_special_tokens=False).input_ids[0],
                                                       base.tokenizer.eos_token_id]


@pytest.mark.parametrize("same_prompt", [False, True])
def test_shared_prefix_loss_equals_full_loss(base, tasks, same_prompt):
    cfg = TrainConfig(dropout=0.0)
    encoded = [[encode(base, ex, cfg) for ex in t.train[:6]] for t in tasks]
    if same_prompt:  # every example the same prompt: the prefix must still stop before the first target
        encoded = [[encode(base, tasks[0].train[0], cfg)] * 3, [encode(base, tasks[0].train[0], cfg)] * 3]
    prefix = prompt_prefix(encoded)
    assert len(prefix) > 10  # the chat template's system turn
    ids, mask, labels = collate(encoded[0][:3] + encoded[1][:3], base.tokenizer.pad_token_id)
    flags = {n: p.requires_grad for n, p in base.model.named_parameters()}
    model = _attach(base, cfg)
    try:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        full = target_loss(model, ids, mask, labels)
        full.backward()
        g_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        shared = prefix_target_loss(model, prefix, ids, mask, labels)
        shared.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, g_full[n], rtol=1e-4, atol=1e-6)
    finally:
        _detach(base, model, flags, False)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)


def test_common_prefix_length_leaves_every_row_a_token_and_respects_the_limit():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical rows keep their last token
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 4, 5]], limit=1) == 1
    assert common_prefix_length([[7], [7, 8]]) == 0 and common_prefix_length([]) == 0


@pytest.mark.slow
def test_phi_twin_trains_too(tiny_phi):
    phi = tiny_phi
    task = resolve_tasks("builtin:first_letter")
    expert = train_expert(phi, task, "first", "private", TrainConfig(**FAST))
    assert expert.info.target_modules == sorted(phi.targets)


def test_bad_arguments(base, tasks):
    with pytest.raises(ValueError, match="Invalid name"):
        train_expert(base, tasks, "bad name", "private", TrainConfig(**FAST))
    with pytest.raises(ValueError, match="no training examples"):
        train_expert(base, [], "x", "private", TrainConfig(**FAST))
    with pytest.raises(ValueError, match="at least 1"):
        train_expert(base, tasks, "x", "private", TrainConfig(steps=0, progress=False))
