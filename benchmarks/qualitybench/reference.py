"""The plain reference loops, written here, sharing only data and models with imitate: `reference` (the plain
training loop `fit` on the collected records) and the plain GKD loop (`fit_gkd`, `reference_gkd`)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

from .build import Built, fit


def reference_records(b: Built) -> list[tuple[list[int], int, int]]:
    """The records as the reference loops train them: (prompt as generation prompt + the teacher's answer text as
    written + end token + what the template writes after it (here "\n"), number of prompt ids, number of ids through
    the end token). imitate trains that tail too, so the reference does, and the columns differ only in the loop."""
    from imitate.records import read_records

    tok = b.tok
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    rendered = tok.apply_chat_template(probe, tokenize=False)
    tail = tok(rendered[rendered.rindex(tok.eos_token) + len(tok.eos_token):], add_special_tokens=False)["input_ids"]
    out = []
    for ln in read_records([b.records], need_assistant=True):
        msgs = ln.data["messages"]
        p_ids = tok.apply_chat_template([{"role": "user", "content": msgs[-2]["content"]}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
        a_ids = tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
        ids = list(p_ids) + a_ids + [tok.eos_token_id]
        out.append((ids + tail, len(p_ids), len(ids)))
    return out


def reference(b: Built, seed: int, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(b.student)
    fit(model, [(ids, n) for ids, n, _ in reference_records(b)], steps=b.train_cfg["steps"],
        batch_size=b.train_cfg["batch_size"], lr=b.train_cfg["lr"], seed=seed, pad_id=b.tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    return out


def sample_answers(model, prompts: list[list[int]], *, eos_id: int, max_tokens: int, gen) -> list[list[int]]:
    """The student's answers at temperature 1, the plain way: prompts of equal length together (no padding at all),
    a full forward per new token (no cache), a token drawn from softmax of the last position, stop after the end
    token (kept) or at max_tokens."""
    import torch

    answers: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    with torch.no_grad():
        for rows in groups.values():
            seqs = torch.tensor([prompts[i] for i in rows])
            live = list(range(len(rows)))
            for _ in range(max_tokens):
                probs = torch.softmax(model(input_ids=seqs[live]).logits[:, -1].double(), -1)
                nxt = torch.multinomial(probs, 1, generator=gen)
                seqs = torch.cat([seqs, torch.zeros(len(rows), 1, dtype=torch.long)], 1)
                seqs[live, -1] = nxt[:, 0]
                for k, r in enumerate(live):
                    answers[rows[r]].append(int(nxt[k, 0]))
                live = [r for k, r in enumerate(live) if int(nxt[k, 0]) != eos_id]
                if not live:
                    break
    return answers


def gkd_losses(model, teacher, seqs: list[list[int]], starts: list[int], ends: list[int], pad_id: int,
               forward: bool = False):
    """(CE summed over each sequence's tokens [starts, len), reverse KL(student || teacher) at temperature 1 (forward:
    KL(teacher || student)) summed over the positions predicting tokens [starts, ends), and the two token counts):
    full logits, one padded batch (right padding, so positions need no care)."""
    import torch
    import torch.nn.functional as F

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    ce_at = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions t whose NEXT token is trained
    kd_at = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (x, a, e) in enumerate(zip(seqs, starts, ends)):
        ids[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), 1
        ce_at[r, a - 1 : len(x) - 1] = True
        kd_at[r, a - 1 : e - 1] = True
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    nxt = torch.roll(ids, -1, 1)
    ce = F.cross_entropy(logits[ce_at], nxt[ce_at], reduction="sum")
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float()[kd_at], -1)
    s_logp = torch.log_softmax(logits[kd_at], -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum() if forward else (s_logp.exp() * (s_logp - t_logp)).sum()
    return ce, kl, int(ce_at.sum()), int(kd_at.sum())


def fit_gkd(model, teacher, encoded: list[tuple[list[int], int, int]], *, steps: int, batch_size: int, lr: float,
            seed: int, pad_id: int, eos_id: int, lam: float, max_tokens: int, w: float = 0.5, ce: bool = True,
            first: int | None = None, warmup: float = 0.03, trace: list | None = None, forward: bool = False) -> None:
    """THE REFERENCE GKD LOOP: `fit`'s batches, schedule and clipping; each step's loss is token means. Off-policy
    steps: (1 - w)·CE + w·reverse KL on the collected answers (KL through the end token, not the template's tail).
    From step `first` (default: half the steps), with probability lam a step is on-policy: the student samples its
    answers (temperature 1, at most max_tokens, `sample_answers`) and trains w·(token-mean reverse KL to the teacher
    on its own tokens), plus (1 - w)·CE on the same records' collected answers when `ce`. forward: KL(teacher ||
    student) in place of the reverse KL, on both kinds of step. trace: gets one
    (step, on-policy, loss, KL per token) tuple per step."""
    import torch

    rng, coin = random.Random(seed), random.Random(seed + 1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    n_warm, first = int(warmup * steps), steps // 2 if first is None else first
    teacher.eval()
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(encoded)), len(encoded))
        batch, order = [encoded[i] for i in order[:batch_size]], order[batch_size:]
        on = step >= first and coin.random() < lam
        seqs, starts, ends = [x for x, _, _ in batch], [n for _, n, _ in batch], [e for _, _, e in batch]
        ce_sum, kl_sum, n_ce, n_kl = gkd_losses(model, teacher, seqs, starts, ends, pad_id, forward)
        loss = (1 - w) * ce_sum / n_ce + w * kl_sum / n_kl
        if on:
            model.eval()  # no dropout while sampling
            answers = sample_answers(model, [x[:n] for x, n, _ in batch], eos_id=eos_id, max_tokens=max_tokens,
                                     gen=gen)
            model.train()
            own = [x[:n] + a for (x, n, _), a in zip(batch, answers)]
            _, kl_sum, _, n_kl = gkd_losses(model, teacher, own, starts, [len(x) for x in own], pad_id, forward)
            loss = w * kl_sum / n_kl + ((1 - w) * ce_sum / n_ce if ce else 0.0)
        if trace is not None:
            trace.append((step, on, float(loss.detach()), float(kl_sum.detach()) / n_kl))
        lr_now = lr * step / max(1, n_warm) if step < n_warm else \
            lr * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))
        for g in opt.param_groups:
            g["lr"] = lr_now
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


def reference_gkd(lam: float, ce: bool = True, forward: bool = False) -> Callable[[Built, int, Path], Path]:
    """The reference GKD loop (`fit_gkd`) as a mode: random-init student, half the steps off-policy first."""

    def train(b: Built, seed: int, out: Path) -> Path:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(b.student)
        teacher = AutoModelForCausalLM.from_pretrained(b.teacher)
        tok = b.tok
        fit_gkd(model, teacher, reference_records(b), steps=b.train_cfg["steps"], batch_size=b.train_cfg["batch_size"],
                lr=b.train_cfg["lr"], seed=seed, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, lam=lam,
                max_tokens=b.task.max_tokens, ce=ce, forward=forward)
        model.save_pretrained(out, safe_serialization=True)
        return out

    return train
