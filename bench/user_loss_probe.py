"""Probe: does next-token loss on the user's own text make Arrow's prototypes point at the task's text?

Arrow's prototype is the top right singular vector of an expert's B·A, a direction on A's *input* side. The
suite's experts are trained with loss on the target tokens only (the paper's setup), so A learns from the hidden
states that produce the answer. On demo-private, subtract's user text routes to add on every held-out prompt;
per token, add wins the digits and " minus", and subtract wins only the template's `<|im_end|>` after the
text, the position that predicts the answer (`python -m explorer trace --library assets/libraries/demo-private
--prompt "What is 83 minus 27?" --granularity token`).

This probe trains experts with an added next-token loss on the user's text (the instruction and the input, not
the chat template), weighted `--user-weight` per token against 1 per target token, then builds a library of them
with the usual `library_store build private` command (every other argument is passed on). Compare its routing
with a library of the same tasks' usual experts:

    .venv/bin/python bench/user_loss_probe.py --user-weight 0.3 --out /tmp/probe-ul \\
        --base-model smollm2-135m-instruct --tasks builtin:add,subtract,multiply_small,compare_numbers \\
        --steps 150 --batch-size 8 --lr 2e-3 --task-steps subtract=450 --threads 2
    .venv/bin/python bench/eval_routing.py --library /tmp/probe-ul --split heldout --n 20 --threads 2 \\
        --top-k 2 --temperature 0.1 --input-centre base --granularity token \\
        --tasks builtin:add,subtract,multiply_small,compare_numbers

Not part of the product: the patch lives in this process only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from library_store import cli  # noqa: E402
from library_store.training import train  # noqa: E402

USER = 1 << 30  # a user-text label is stored as USER + token id; target labels stay token ids


def user_text_encoder(original):
    def encode(base, ex, config):
        enc = original(base, ex, config)
        text = base.format_prompt(ex.input, chat=config.chat)
        start, end = text.rfind(ex.input), text.rfind(ex.input) + len(ex.input)
        tok = base.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        n_prompt = sum(1 for lab in enc.labels if lab == train.IGNORE)  # the prompt, cut from the left
        cut = len(tok.input_ids) - n_prompt
        labels = list(enc.labels)
        for j in range(1, n_prompt):  # position 0 has nothing before it to predict it
            a, b = tok.offset_mapping[cut + j]
            if start <= a and b <= end:
                labels[j] = USER + tok.input_ids[cut + j]
        return train.Encoded(enc.ids, labels)
    return encode


def weighted_loss(weight: float):
    def loss(model, prefix, ids, mask, labels):
        logits, lab = train.prefix_logits(model, prefix, ids, mask, labels)  # (n, V), (n,)
        user = lab >= USER  # (n,)
        w = torch.where(user, weight, 1.0)  # (n,)
        ce = F.cross_entropy(logits.float(), lab - USER * user, reduction="none")  # (n,)
        return (w * ce).sum() / w.sum()
    return loss


def no_shared_prefix(*_args, **_kwargs):
    raise SystemExit("user_loss_probe: the weighted loss runs on a shared prompt prefix (the chat template's system "
                     "turn); these examples share none (--no-chat?).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--user-weight", type=float, required=True, help="loss weight of a user-text token")
    args, rest = ap.parse_known_args()
    train.encode = user_text_encoder(train.encode)
    train.prefix_target_loss = weighted_loss(args.user_weight)
    train.target_loss = no_shared_prefix
    sys.exit(cli.main(["build", "private", *rest]))


if __name__ == "__main__":
    main()
