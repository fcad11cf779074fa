"""Train one LoRA expert on a mixture of tasks (private, warm-up and cluster experts all come from here).

Usage::

    base = load_base_model("smollm2-135m-instruct")
    expert = train_expert(base, [task], name="add", kind="private", config=TrainConfig(steps=150))
    expert, w_init = train_expert(base, tasks, "add", "warmup", TrainConfig(init_seed=0), return_init=True)

The paper's setup (rank 4, alpha 16, dropout 0.05, attention targets, AdamW, loss on target tokens only) with
CPU-sized defaults. The base model is left exactly as it was: PEFT's layers are unloaded afterwards and the
parameters' `requires_grad` flags and train/eval mode are restored.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from library_store.expert import ExpertInfo, LoraExpert, TrainRecord, check_name
from library_store.tasks.core import Example, Task
from library_store.training.prefix import SharedPrefix, common_prefix_length

IGNORE = -100  # label value that cross_entropy skips: the prompt tokens
MIN_SHARED_PREFIX = 4  # below this, running the prefix separately saves nothing


@dataclass
class TrainConfig:
    rank: int = 4  # the paper's rank
    alpha: float = 16.0  # scaling alpha / rank = 4, as in the paper
    dropout: float = 0.05
    steps: int = 150  # CPU-sized; the paper trains one epoch of FLAN on a GPU
    batch_size: int = 8
    lr: float = 1e-3  # 1e-4 is the paper's (Phi-2, long runs); short CPU runs need more to learn
    warmup: float = 0.06  # fraction of steps with a linear lr ramp, then linear decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0  # data order and dropout
    init_seed: int | None = None  # LoRA init seed; warm-up experts share one so MBC sees only what training changed
    max_len: int = 96  # tokens per example (prompt + target); longer prompts are cut from the left
    chat: bool = True  # wrap inputs in the model's chat template, as the page and the evaluation do
    targets: list[str] | None = None  # LoRA target leaf names; None = the base model's defaults
    share_prefix: bool = True  # run the prompt prefix all examples share once per step (same loss, ~2x faster)
    progress: bool = True  # tqdm bar
    device: str = "cpu"  # where the steps run; the base model must already be there (the build moves it)


@dataclass
class Encoded:
    """One tokenized example: ids = prompt + target + eos; labels = -100 on the prompt."""

    ids: list[int]
    labels: list[int] = field(repr=False)


def encode(base, ex: Example, config: TrainConfig) -> Encoded:
    tok = base.tokenizer
    prompt = tok(base.format_prompt(ex.input, chat=config.chat), add_special_tokens=False).input_ids
    target = tok(ex.target, add_special_tokens=False).input_ids + [tok.eos_token_id]
    target = target[: config.max_len - 1]
    prompt = prompt[-(config.max_len - len(target)):]  # keep the end of the prompt: the generation prompt
    return Encoded(prompt + target, [IGNORE] * len(prompt) + target)


def collate(batch: list[Encoded], pad_id: int):
    """Right-padded (b, t) ids, mask and labels."""
    t = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.ids)] = torch.tensor(e.labels)
        mask[i, : len(e.ids)] = 1
    return ids, mask, labels


def target_loss(model, ids, mask, labels) -> torch.Tensor:
    """Next-token loss on the target tokens only. The vocabulary projection runs on those few positions
    alone (a 49k-wide lm_head over every prompt token would cost as much as the rest of the step)."""
    inner = model.get_base_model()
    try:
        decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        decoder = head = None
    if decoder is None or head is None:
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, t, d)
    shifted = labels[:, 1:]  # (b, t-1): token t+1 is predicted at position t
    keep = shifted != IGNORE  # (b, t-1)
    logits = head(hidden[:, :-1][keep])  # (n, V)
    return F.cross_entropy(logits.float(), shifted[keep])


def prompt_prefix(encoded: list[list[Encoded]]) -> list[int]:
    """The token prefix every example starts with (the chat template's system turn, for instance). It stops
    before the token ahead of the first target: that token's prediction of the first target is a loss term
    made inside the prefix, which `prefix_target_loss` does not compute."""
    examples = [e for group in encoded for e in group]
    first_target = min((next((i for i, lab in enumerate(e.labels) if lab != IGNORE), len(e.labels))
                        for e in examples), default=0)
    n = common_prefix_length([e.ids for e in examples], limit=max(first_target - 1, 0))
    return examples[0].ids[:n] if n else []


def prefix_target_loss(model, prefix: list[int], ids, mask, labels) -> torch.Tensor:
    """`target_loss` with the shared prompt prefix run once per step instead of once per example: its keys
    and values (which the LoRA changes, so they carry gradients) are repeated over the batch. With the chat
    template's system turn that is over half the tokens of a step. Same loss as `target_loss`."""
    logits, targets = prefix_logits(model, prefix, ids, mask, labels)
    return F.cross_entropy(logits.float(), targets)


def prefix_logits(model, prefix: list[int], ids, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """`prefix_target_loss`'s forward: the logits (n, V) at the n positions whose next token has a label (any value
    but IGNORE), and those labels (n,)."""
    inner = model.get_base_model()
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    p = len(prefix)
    shared = SharedPrefix(decoder, prefix)  # run once per step: the LoRA weights changed since the last one
    suffix, smask, slabels = ids[:, p:], mask[:, p:], labels[:, p:]  # (b, s)
    full_mask = torch.cat([torch.ones_like(mask[:, :p]), smask], dim=1)  # (b, p + s)
    hidden = decoder(input_ids=suffix, attention_mask=full_mask, use_cache=True,
                     **shared.kwargs(ids.shape[0], copy=False)).last_hidden_state  # (b, s, d)
    shifted = slabels[:, 1:]  # (b, s-1); the prefix predicts no target token (prompt_prefix ensures it)
    keep = shifted != IGNORE
    return head(hidden[:, :-1][keep]), shifted[keep]  # (n, V), (n,)


class _Mixture:
    """Batches that draw a task uniformly, then one of its examples: every task of a cluster gets its share."""

    def __init__(self, encoded: list[list[Encoded]], seed: int):
        self.encoded = [e for e in encoded if e]
        self.rng = random.Random(seed)

    def batch(self, size: int) -> list[Encoded]:
        return [self.rng.choice(self.rng.choice(self.encoded)) for _ in range(size)]


def _lr_lambda(config: TrainConfig):
    warm = max(1, int(round(config.warmup * config.steps)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (config.steps - step) / max(1, config.steps - warm))
    return f


def _lora_config(base, config: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.targets or base.targets), bias="none")


def _attach(base, config: TrainConfig):
    """PEFT-wrap the base model with a LoRA initialised from a fixed seed (A: kaiming, B: zero)."""
    from peft import get_peft_model

    torch.manual_seed(config.seed if config.init_seed is None else config.init_seed)
    return get_peft_model(base.model, _lora_config(base, config))


def _detach(base, peft_model, flags: dict, was_training: bool) -> None:
    base.model = peft_model.unload()  # removes the LoRA layers without merging anything
    for name, p in base.model.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(base.model):
            delattr(base.model, attr)
    base.model.train(was_training)


def lora_init_state(base, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The LoRA weights training starts from for `config.init_seed` (W_init for MBC), without training."""
    from peft import get_peft_model_state_dict

    flags = {n: p.requires_grad for n, p in base.model.named_parameters()}
    was_training = base.model.training
    peft_model = _attach(base, config)
    try:
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    finally:
        _detach(base, peft_model, flags, was_training)


def train_expert(base, tasks: list[Task], name: str, kind: str = "private", config: TrainConfig | None = None,
                 return_init: bool = False, cluster: str | None = None):
    """Train a LoRA on the union of `tasks` (balanced per task); return the `LoraExpert` (and W_init)."""
    from peft import get_peft_model_state_dict
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    check_name(name)
    if not tasks or not any(t.train for t in tasks):
        raise ValueError(f"Expert {name!r}: no training examples.")
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError("steps and batch_size must be at least 1.")
    encoded = [[encode(base, ex, config) for ex in t.train] for t in tasks]
    mixture = _Mixture(encoded, config.seed)
    prefix = prompt_prefix(encoded) if config.share_prefix else []
    pad_id = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else base.tokenizer.eos_token_id

    flags = {n: p.requires_grad for n, p in base.model.named_parameters()}
    was_training = base.model.training
    peft_model = _attach(base, config)
    try:
        init = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
        torch.manual_seed(config.seed)  # dropout masks
        peft_model.train()
        losses: list[float] = []
        start = time.perf_counter()
        bar = tqdm(range(config.steps), desc=f"train {name}", disable=not config.progress, leave=False)
        # new tensors (batches, the shared prefix) go to the device; on the CPU no mode at all (it costs per op)
        on_device = contextlib.nullcontext() if config.device == "cpu" else torch.device(config.device)
        with on_device:
            for _ in bar:
                ids, mask, labels = collate(mixture.batch(config.batch_size), pad_id)
                if len(prefix) >= MIN_SHARED_PREFIX:
                    loss = prefix_target_loss(peft_model, prefix, ids, mask, labels)
                else:
                    loss = target_loss(peft_model, ids, mask, labels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds = time.perf_counter() - start
        state = get_peft_model_state_dict(peft_model)
        state = {k: v.detach().clone() for k, v in state.items()}
    finally:
        _detach(base, peft_model, flags, was_training)

    tail = losses[-10:]
    record = TrainRecord(steps=config.steps, lr=config.lr, batch_size=config.batch_size,
                         examples=sum(len(t.train) for t in tasks), seed=config.seed,
                         final_loss=float(sum(tail) / len(tail)) if tail and math.isfinite(sum(tail)) else None,
                         seconds=round(seconds, 2), init_seed=config.init_seed)
    info = ExpertInfo(name=name, kind=kind, tasks=[t.name for t in tasks], cluster=cluster, rank=config.rank,
                      alpha=config.alpha, train=record)
    expert = LoraExpert.from_state_dict(info, state)
    return (expert, init) if return_init else expert


@contextlib.contextmanager
def attached(base, expert: LoraExpert):
    """`with attached(base, expert): base.generate(...)` runs the base model with one expert plugged in
    (dropout off); the base model is restored on exit, even after an error."""
    from peft import set_peft_model_state_dict

    config = TrainConfig(rank=expert.info.rank, alpha=expert.info.alpha, dropout=0.0,
                         targets=list(expert.info.target_modules) or None, progress=False)
    flags = {n: p.requires_grad for n, p in base.model.named_parameters()}
    was_training = base.model.training
    peft_model = _attach(base, config)
    try:
        dtype = next(base.model.parameters()).dtype
        set_peft_model_state_dict(peft_model, {k: v.to(dtype) for k, v in expert.weights.items()})
        peft_model.eval()
        yield peft_model
    finally:
        _detach(base, peft_model, flags, was_training)
