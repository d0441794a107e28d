"""`imitate eval`: generate with the student on held-out prompts and score it; with --min-score, a gate for CI.

What is scored against what:
    reference     with --reference-field F, each row's field F (a string, a number, or a list of accepted answers);
                  otherwise the teacher's answer: so `score` is then the agreement with the teacher.
    teacher       `--teacher SPEC` asks that teacher (greedy) for every prompt; without it, rows whose `messages` end
                  with an assistant turn (records from collect) carry the teacher's answer, which is not shown to the
                  student.
    context       the student is always asked WITHOUT a record's `context` (turns only the teacher saw, see
                  imitate.records); a teacher asked with --teacher gets it in front: the rows' own `context`, or
                  --teacher-context FILE (as `collect --context`). So one table shows the teacher with its prompt
                  (`teacher_score`), the untrained student and the trained one, each without it.
Match modes (`--match`):
    exact         equal after normalisation: Unicode NFKC, case folded, leading/trailing whitespace dropped, inner
                  whitespace runs collapsed to one space ("  Three  hundred\n" == "three hundred")
    contains      the normalised reference occurs inside the normalised answer
    regex         the reference is a Python regular expression searched (re.search) in the raw answer; add (?i) for
                  case-insensitive. Agreement with the teacher (an answer, not a pattern) uses exact then.
With teacher answers available, the student's mean per-token negative log-likelihood of them (`loss`, nats/token,
assistant tokens only, rendered exactly as `imitate train` renders records) is reported too.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from imitate.config import to_dict
from imitate.errors import GateFailed, ImitateError, InputError, UsageError
from imitate.locks import locks_outputs, wait_lock_opt
from imitate.options import Checked, opt
from imitate.progress import Bar
from imitate.scoring import MATCH_MODES, rouge_l, score


@dataclass(frozen=True)
class EvalConfig(Checked):
    model: Path | None = opt(None, "Student: a model directory, a LoRA adapter directory (its adapter_config.json names "
                             "the base) or a hub id.", example="runs/student1", path=True, default_text="required")
    prompts: Path | None = opt(None, "Held-out JSONL rows with prompt or messages (a final assistant turn = the "
                               "teacher's answer).", example="data/eval.jsonl", input=True, default_text="required")
    teacher: str | None = opt(None, "Ask this teacher (greedy) for the answers to agree with; API teachers go through "
                              "collect (cached in OUT.teacher.jsonl).", example="hf:./teacher",
                              default_text="the answers in the rows")
    teacher_context: Path | None = opt(
        None, "Turns --teacher sees in front of every prompt (the student never does), as collect's --context: "
        ".json/.jsonl turns, .txt system text or a .j2 template per row.", example="prompts/house_style.json",
        input=True, default_text="the rows' own context")
    reference_field: str | None = opt(None, "Score against this field of each row (a string, a number or a list of "
                                      "accepted answers) instead of the teacher.", example="answer")
    match: Literal["exact", "contains", "regex"] = opt(
        "exact", "How an answer is compared: exact (case/whitespace-normalised), contains, or regex (the reference is "
        "a pattern).", example="contains")
    min_score: float | None = opt(None, "Gate: exit code 3 when the score (0..1) is below this, after the results "
                                  "are written.", example="0.8", ge=0, le=1)
    out: Path | None = opt(None, "Results JSONL, one line per prompt.", example="eval.results.jsonl", path=True)
    wait_lock: float = wait_lock_opt()
    batch_size: int = opt(16, "Prompts generated together; lower it if the GPU runs out of memory.", example="32",
                          ge=1)
    max_tokens: int = opt(256, "Longest answer in new tokens; longer answers are cut and counted as truncated.",
                          example="64", ge=1)
    trust_remote_code: bool = opt(False, "Run model code shipped with the model (only for models you trust).",
                                  example="--trust-remote-code", flag="--trust-remote-code/--no-trust-remote-code")
    device: str | None = opt(None, "Torch device for the student (and an hf teacher).", example="cpu",
                             default_text="cuda when present, else cpu")

    def check(self) -> None:
        if self.model is None or self.prompts is None:
            raise UsageError(
                "imitate eval needs --model and --prompts",
                hint="e.g. imitate eval --model out/student --prompts data/eval.jsonl --reference-field answer",
            )
        if self.teacher_context is not None and not self.teacher:
            raise UsageError("--teacher-context is what --teacher is asked with, and no --teacher is given",
                             hint="add --teacher SPEC (the student is always scored without the context)")
        if self.match == "regex" and not self.reference_field:
            raise UsageError(
                "--match regex needs --reference-field: the teacher's answers are not patterns",
                hint="put a pattern per row in a field, e.g. --reference-field pattern",
            )


@dataclass
class Item:
    """One held-out prompt."""

    where: str  # "file:line"
    messages: list[dict]  # what the student (and teacher) is asked
    shown: Any  # the prompt as written in the results: the `prompt` string or the messages
    reference: list[str] | None = None  # accepted answers from --reference-field
    teacher: str | None = None  # the teacher's answer (from the row or from --teacher)
    context: list[dict] = field(default_factory=list)  # turns only the teacher is asked with (never the student)


# ------------------------------------------------------------------------------------------------ reading prompts


def _references(value: Any, where: str, field: str, match: str) -> list[str]:
    if value is None:
        raise InputError(
            f"{where}: no field {field!r} (the reference)",
            hint="give every row that field, or pick another with --reference-field",
        )
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
        raise InputError(f"{where}: field {field!r} must be a string, a number or a list of them, got {value!r}")
    refs = [str(v) for v in values]
    if match == "regex":
        for r in refs:
            try:
                re.compile(r)
            except re.error as exc:
                raise InputError(
                    f"{where}: field {field!r} is not a valid regex ({exc})",
                    hint="escape special characters, or use --match exact/contains",
                ) from None
    return refs


def read_items(path: Path, reference_field: str | None, match: str, context: Any = None) -> list[Item]:
    """Held-out prompts; malformed rows are errors naming file:line. context: a `collect.context.Context` rendered
    per row for the teacher (else the rows' own `context` field)."""
    from imitate.records import check_messages, iter_jsonl, messages_problem, prompt_messages

    items = []
    for line in iter_jsonl(path):
        where = f"{line.path}:{line.lineno}"
        row = line.data
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        teacher = None
        if "messages" in row:
            msgs = check_messages(row["messages"], where)
            if msgs[-1]["role"] == "assistant":
                teacher = msgs[-1]["content"]
            msgs = prompt_messages({"messages": msgs})
            if not msgs:
                raise InputError(f"{where}: 'messages' holds only an assistant turn; nothing to ask the student")
            shown: Any = msgs
        elif isinstance(row.get("prompt"), str):
            msgs, shown = [{"role": "user", "content": row["prompt"]}], row["prompt"]
        else:
            raise InputError(f"{where}: a row needs 'prompt' (a string) or 'messages' (a chat list)")
        refs = _references(row.get(reference_field), where, reference_field, match) if reference_field else None
        if context is not None:
            turns = context.turns(row, where)
        else:
            turns = list(row.get("context") or [])
            problem = messages_problem(turns, field="context") if turns else None
            if problem:
                raise InputError(f"{where}: {problem}")
        items.append(Item(where, msgs, shown, refs, teacher, turns))
    if not items:
        raise InputError(f"{path}: no prompts", hint="one JSON object per line with 'prompt' or 'messages'")
    return items


# ------------------------------------------------------------------------------------------------ model work


def _chunks(n: int, size: int) -> Iterator[slice]:
    for s in range(0, n, max(1, size)):
        yield slice(s, min(n, s + max(1, size)))


def ask_teacher(spec: str, items: list[Item], cfg: EvalConfig) -> None:
    """Fill item.teacher with the teacher's greedy answers (temperature 0, --max-tokens)."""
    from imitate.collect.teachers import Request, parse_spec

    provider, name = parse_spec(spec)
    if provider != "hf":
        return _collect_answers(spec, items, cfg)
    from imitate.collect.teachers.local import LocalTeacher

    teacher = LocalTeacher(name, device=cfg.device, batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code)
    params = {"temperature": 0, "max_tokens": cfg.max_tokens}
    requests = [Request(id=str(i), messages=it.context + it.messages, params=params, context_turns=len(it.context))
                for i, it in enumerate(items)]
    with Bar("teacher", len(items), elapsed=True) as bar:
        for sl in _chunks(len(items), cfg.batch_size):
            for it, c in zip(items[sl], teacher.complete_sync(requests[sl])):
                it.teacher = c.text
            bar.update(advance=sl.stop - sl.start)
    asyncio.run(teacher.aclose())


def _collect_answers(spec: str, items: list[Item], cfg: EvalConfig) -> None:
    """API teachers go through `imitate collect` (keys, pacing, retries, journal): with --out, the teacher's answers
    are kept in OUT.teacher.jsonl, so re-running the eval never pays for them twice."""
    import json
    import tempfile

    from imitate.collect import stage as collect
    from imitate.records import assistant_text, context_of, prompt_messages, read_records

    def key(context: list[dict], messages: list[dict]) -> str:
        return json.dumps([context, messages], sort_keys=True, ensure_ascii=False)

    scratch = None if cfg.out else tempfile.TemporaryDirectory(prefix="imitate-eval-")
    journal = Path(f"{cfg.out}.teacher.jsonl") if cfg.out else Path(scratch.name) / "teacher.jsonl"
    ccfg = collect.CollectConfig(
        teacher=spec, out=journal, prompts=cfg.prompts, temperature=0.0, max_tokens=cfg.max_tokens,
        context=cfg.teacher_context,  # None: collect keeps the rows' own context, as here
    )
    try:
        done = collect.run(ccfg)
        params = collect.params_of(ccfg)
        answers = {
            key(context_of(ln.data), prompt_messages(ln.data)): assistant_text(ln.data)
            for ln in read_records(journal)
            if ln.data.get("teacher") == spec and ln.data.get("params") == params
        }
    finally:
        if scratch is not None:
            scratch.cleanup()
    for it in items:
        it.teacher = answers.get(key(it.context, it.messages))
        if it.teacher is None:
            raise ImitateError(
                f"{it.where}: the teacher {spec} gave no answer ({done.get('failed', 0)} requests failed)",
                hint="see the failures file collect reported; re-running retries only the missing requests",
            )


def answer_nll(model: Any, tokenizer: Any, conversations: list[list[dict]], batch_size: int) -> list[tuple[float, int]]:
    """(summed NLL in nats, number of tokens) of each conversation's final assistant turn under `model`.

    Tokens and targets come from `imitate.train.data.encode` (the training format: the answer and its end-of-turn
    marker), the loss from `imitate.train.losses.forward_ce` (the training CE path: logits only at target positions,
    cut to the real vocabulary), one row at a time inside a padded batch forward.
    """
    import torch

    from imitate.train.data import Example, collate, encode, shift_targets
    from imitate.train.distill import unwrap
    from imitate.train.losses import chunked_ce, forward_ce
    from imitate.train.step import to_device

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows_in_head = unwrap(model).get_output_embeddings().weight.shape[0]
    vocab_size = len(tokenizer) if len(tokenizer) <= rows_in_head else None
    out: list[tuple[float, int]] = []
    for sl in _chunks(len(conversations), batch_size):
        rows = [encode(tokenizer, conv) for conv in conversations[sl]]
        batch = collate([Example(r, shift_targets(r, m), "") for r, m in rows], pad_id=pad, packing=False)
        batch = to_device(batch, device)
        with torch.inference_mode():
            _, outputs = forward_ce(model, batch, vocab_size=vocab_size)
            hidden, head = outputs.hidden_states[-1], unwrap(model).get_output_embeddings()
            for r in range(len(rows)):  # per-row sums of the same chunked CE
                nll, n = chunked_ce(hidden[r : r + 1], head, batch["labels"][r : r + 1], vocab_size=vocab_size)
                out.append((float(nll), n))
    return out


def _mean(xs: list[int]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def score_items(
    items: list[Item], answers: list[Any], losses: dict[int, tuple[float, int]], match: str
) -> tuple[list[dict], dict[str, Any]]:
    """One results row per item, and the 0/1 lists the summary averages: score, agreement, teacher, by match mode."""
    agree_match = "exact" if match == "regex" else match  # a teacher answer is text, not a pattern
    results, agreements, teacher_scores = [], [], []
    # every mode that applies, `match` among them: its list is the score
    by_mode: dict[str, list[int]] = {m: [] for m in MATCH_MODES if m != "regex" or match == "regex"}
    for i, (it, ans) in enumerate(zip(items, answers)):
        refs = it.reference if it.reference is not None else [it.teacher]
        row: dict[str, Any] = {
            "where": it.where,
            "prompt": it.shown,
            "answer": ans.text,
            "reference": refs[0] if len(refs) == 1 else refs,
        }
        for m, hits in by_mode.items():
            hits.append(score(ans.text, refs, m))
        row["score"] = by_mode[match][-1]
        row["rouge_l"] = max(rouge_l(ans.text, r) for r in refs) if match != "regex" else None
        if it.teacher is not None:
            row["teacher_answer"] = it.teacher
            row["agreement"] = score(ans.text, [it.teacher], agree_match)
            agreements.append(row["agreement"])
            if it.reference is not None:
                teacher_scores.append(score(it.teacher, it.reference, match))
            s, n = losses[i]
            row["loss"] = s / n if n else None
        row["finish_reason"] = ans.finish_reason
        results.append(row)

    tally = {"score": by_mode[match], "agreement": agreements, "teacher": teacher_scores, "by_mode": by_mode}
    return results, tally


# ------------------------------------------------------------------------------------------------ the stage


@locks_outputs("eval")  # the results file: one writer
def run(cfg: EvalConfig) -> dict:
    """Generate, score, write results, then apply the gate. Returns the summary (what --json prints)."""
    from imitate.models import generate_batch, load_model, resolve_model

    t0 = time.monotonic()
    resolve_model(str(cfg.model))  # cheap checks first: a missing student fails before reading or teacher work
    context = None
    if cfg.teacher_context is not None:
        from imitate.collect.context import load as load_context

        context = load_context(cfg.teacher_context)
    items = read_items(Path(cfg.prompts), cfg.reference_field, cfg.match, context)
    if cfg.teacher:
        ask_teacher(cfg.teacher, items, cfg)
    with_teacher = [it for it in items if it.teacher is not None]
    if cfg.reference_field is None and len(with_teacher) < len(items):
        first = next(it for it in items if it.teacher is None)
        raise InputError(
            f"{first.where}: nothing to score against: no --reference-field and no teacher answer",
            hint="give --reference-field FIELD, --teacher SPEC, or records whose messages end with the teacher's "
            "answer",
        )

    model, tokenizer = load_model(str(cfg.model), device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    answers = []
    with Bar("student", len(items), elapsed=True) as bar:
        for sl in _chunks(len(items), cfg.batch_size):
            answers += generate_batch(model, tokenizer, [it.messages for it in items[sl]], max_tokens=cfg.max_tokens)
            bar.update(advance=sl.stop - sl.start)
    losses: dict[int, tuple[float, int]] = {}
    if with_teacher:
        idx = [i for i, it in enumerate(items) if it.teacher is not None]
        convs = [items[i].messages + [{"role": "assistant", "content": items[i].teacher}] for i in idx]
        losses = dict(zip(idx, answer_nll(model, tokenizer, convs, cfg.batch_size)))

    results, tally = score_items(items, answers, losses, cfg.match)
    tok_sum, tok_n = sum(s for s, _ in losses.values()), sum(n for _, n in losses.values())
    summary: dict[str, Any] = {
        "stage": "eval",
        "n": len(items),
        "score": _mean(tally["score"]),
        "match": cfg.match,
        "reference": f"field:{cfg.reference_field}" if cfg.reference_field else "teacher",
        "agreement": _mean(tally["agreement"]),  # student == teacher answer, over rows that have one
        "teacher_score": _mean(tally["teacher"]),  # the teacher against the reference field, when both exist
        # prompts whose teacher answer came with a context in front (the student was asked without it)
        "teacher_context": sum(1 for it in items if it.context and it.teacher is not None),
        "loss": tok_sum / tok_n if tok_n else None,  # mean NLL per teacher-answer token (nats)
        "perplexity": math.exp(tok_sum / tok_n) if tok_n and tok_sum / tok_n < 50 else None,
        # ROUGE-L F1 of the answer against its reference (the teacher's answer without --reference-field)
        "rouge_l": _mean([r["rouge_l"] for r in results]) if cfg.match != "regex" else None,
        "scores_by_match": {m: _mean(v) for m, v in tally["by_mode"].items()},
        "truncated": sum(1 for a in answers if a.finish_reason == "length"),
        "min_score": cfg.min_score,
        "passed": None if cfg.min_score is None else _mean(tally["score"]) >= cfg.min_score,
        "out": str(cfg.out) if cfg.out else None,
        "wall_s": round(time.monotonic() - t0, 3),
        "config": to_dict(cfg),
    }
    if cfg.out:
        from imitate.records import write_jsonl

        write_jsonl(cfg.out, results)
    from imitate.cards import add_eval

    add_eval(cfg.model, summary)  # an imitate-trained model: its card (README.md) gets these scores
    _print_summary(summary)
    if summary["passed"] is False:
        exc = GateFailed(
            f"eval gate failed: score {summary['score']:.4f} < --min-score {cfg.min_score}",
            hint=f"see the per-prompt results in {cfg.out}"
            if cfg.out
            else "add --out RESULTS.jsonl to see each answer",
        )
        exc.summary = summary  # type: ignore[attr-defined]  # for `imitate run --json`
        raise exc
    return summary


def _print_summary(s: dict) -> None:
    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)

    lines = [f"eval: {s['n']} prompts, score {fmt(s['score'])} ({s['match']} vs {s['reference']})"]
    if s["agreement"] is not None:
        lines.append(
            f"  agreement with teacher {fmt(s['agreement'])}, loss on teacher answers {fmt(s['loss'])} nats/token"
        )
    if s.get("rouge_l") is not None:
        lines.append(f"  ROUGE-L vs {s['reference']} {fmt(s['rouge_l'])}")
    if s["teacher_score"] is not None:
        lines.append(f"  teacher score {fmt(s['teacher_score'])}"
                     + (" (asked with its context; the student without)" if s.get("teacher_context") else ""))
    if s["truncated"]:
        lines.append(f"  {s['truncated']} answers hit --max-tokens")
    if s["passed"] is not None:
        lines.append(f"  gate --min-score {s['min_score']}: {'passed' if s['passed'] else 'FAILED'}")
    if s["out"]:
        lines.append(f"  results: {s['out']}")
    print("\n".join(lines), file=sys.stderr)
