"""Distillation inside `imitate train`: the teacher, the KD loss terms of one micro-batch, the SCKD gate's wiring.

Three sources of teacher signal, one loss convention (token SUMS, divided by the window's target-token count in
train.py exactly like the cross-entropy):
- logit KD (`--teacher hf:...`): the frozen teacher runs under no_grad on the same micro-batch; the term is
  T² · Σ_tokens D(teacher_T, student_T) over target (assistant) tokens, computed chunk by chunk from the two models'
  final hidden states and output heads (`losses.chunked_kd_loss`), so [tokens × vocab] logits never exist whole.
- feature KD (`--feature-kd`): per (student layer, teacher layer) pair, MSE between a learned linear map of the
  student's hidden state and the teacher's, over target tokens (`features.FeatureRegressors`; trained with the student).
- gray-box KD (records with collected top-K `logprobs`, no `--teacher`): `losses.sparse_topk_kd` against the collected
  log-probabilities, aligned to the tokenized examples once, at data preparation (`prepare_graybox`).
Objective without SCKD: (1 − w)·CE + w·(logit KD or gray-box KD) + feature_weight·Σ feature terms.
With `--sckd` each KD term is gated every optimizer step by `sckd.SCKDGate` (train.py's `accumulate_window`).

Order of work (cheap things first): option checks -> teacher tokenizer check + both configs (vocab width, layers) ->
data -> weights. `plan_teacher` / `graybox_plan` settle everything that needs no weights; `setup` loads.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from imitate.errors import ImitateError, InputError, UsageError
from imitate.train.data import IGNORE, model_inputs, teacher_written

LOGIT = "logit_kd"
GRAYBOX = "graybox_kd"
ONPOLICY = "onpolicy_kd"  # logit KD on the student's own answers (imitate/train/onpolicy.py)


def check_options(cfg: Any) -> None:
    """The teacher reference resolves (a local path exists), before anything is loaded; TrainConfig checked the rest."""
    if cfg.teacher:
        teacher_ref(cfg.teacher)


def teacher_ref(spec: str) -> str:
    """`hf:PATH_OR_ID` -> the checked model reference (a directory, a peft adapter directory or a hub id)."""
    from imitate.collect.teachers import parse_spec
    from imitate.models import resolve_model

    provider, model = parse_spec(spec)
    if provider != "hf":
        raise UsageError(
            f"--teacher {spec}: white-box distillation needs the teacher's weights (an hf:PATH_OR_ID model)",
            hint=f"for an API teacher collect its answers (`imitate collect --teacher {spec}`, add --logprobs K for "
            "gray-box KD where the API gives them) and train on the records without --teacher",
        )
    return resolve_model(model)


@dataclass
class Plan:
    """What distillation needs, settled before any weights load."""

    teacher: str | None = None  # model reference (directory / hub id), None for gray-box or none
    vocab_size: int | None = None  # real vocabulary: logits are cut to it
    pairs: list[tuple[int, int]] = field(default_factory=list)  # feature KD (student layer, teacher layer)
    student_width: int = 0
    teacher_width: int = 0
    graybox: dict | None = None  # the gray-box report (counts, notes), None when gray-box is not used
    terms: list[str] = field(default_factory=list)  # KD term names, in order


def _configs(base: str, trust_remote_code: bool) -> Any:
    """The text config of a model directory or hub id (an adapter's base, see local.model_refs); no weights are read."""
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ImitateError(f"cannot read the model config of {base}: {str(exc).splitlines()[0]}") from None
    return conf.get_text_config() if hasattr(conf, "get_text_config") else conf


def plan_teacher(cfg: Any, tokenizer: Any, student: str) -> Plan:
    """Teacher tokenizer check, real vocab size and feature pairs: tokenizers and configs only, no weights."""
    from transformers import AutoTokenizer

    from imitate.models import model_refs
    from imitate.train import features, vocab

    ref = teacher_ref(cfg.teacher)
    base, _, tok_dir = model_refs(ref)
    t_conf = _configs(base, cfg.trust_remote_code)
    try:
        t_tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ImitateError(f"cannot load the tokenizer of teacher {cfg.teacher}: {str(exc).splitlines()[0]}") from None
    vocab.check_tokenizers(tokenizer, t_tok, teacher=f"teacher {cfg.teacher}")
    s_conf = _configs(student, cfg.trust_remote_code)
    plan = Plan(teacher=ref, student_width=s_conf.hidden_size, teacher_width=t_conf.hidden_size)
    plan.vocab_size = vocab.real_vocab_size(tokenizer, s_conf.vocab_size, t_conf.vocab_size)
    if cfg.feature_kd:
        plan.pairs = features.parse_pairs(cfg.feature_kd, s_conf.num_hidden_layers, t_conf.num_hidden_layers)
    plan.terms = [LOGIT] + [features.term_name(p) for p in plan.pairs] + ([ONPOLICY] if cfg.on_policy else [])
    return plan


def graybox_plan(tokenizer: Any, student: str, report: dict, trust_remote_code: bool) -> Plan:
    """The plan of a gray-box run: one sparse KD term, logits cut to the real vocabulary."""
    from imitate.train import vocab

    s_conf = _configs(student, trust_remote_code)
    size = vocab.real_vocab_size(tokenizer, s_conf.vocab_size, s_conf.vocab_size)
    return Plan(vocab_size=size, student_width=s_conf.hidden_size, graybox=report, terms=[GRAYBOX])


# ---------------------------------------------------------------------------------------------------------------------
# gray-box: collected log-probabilities -> top-K rows aligned with the examples' targets
# ---------------------------------------------------------------------------------------------------------------------


def _final_run(labels: list[int]) -> list[int]:
    """Labels with only the LAST contiguous run of targets kept: the final assistant turn, the one the logprobs of a
    record describe (with --loss-on all, earlier assistant turns are targets too but have no logprobs)."""
    out = [IGNORE] * len(labels)
    t = len(labels) - 1
    while t >= 0 and labels[t] == IGNORE:
        t -= 1
    while t >= 0 and labels[t] != IGNORE:
        out[t] = labels[t]
        t -= 1
    return out


def _teacher_tokenizer(spec: str | None, tokenizer: Any, cache: dict) -> tuple[bool, str | None]:
    """(at hand, why not the student's) for a record's teacher: an hf teacher whose directory (or cached hub id) is
    here is loaded once and checked with `check_tokenizers`; other teachers are not at hand (why = None)."""
    if spec not in cache:
        at_hand, why = False, None
        from imitate.models import model_refs, resolve_model, split_ref

        provider, model = split_ref(spec or "")
        if provider == "hf" and model:
            from transformers import AutoTokenizer

            from imitate.train import vocab

            try:
                t_tok = AutoTokenizer.from_pretrained(model_refs(resolve_model(model))[2])
                at_hand = True
                vocab.check_tokenizers(tokenizer, t_tok, teacher=spec)
            except ImitateError as exc:
                why = exc.message if at_hand else None
            except (OSError, ValueError):
                pass  # not at hand here
        cache[spec] = (at_hand, why)
    return cache[spec]


def _teacher_tokenizer_ok(spec: str | None, tokenizer: Any, cache: dict) -> str | None:
    """None when the record's teacher may share the student's tokenizer, else why not. Teachers not at hand cannot be
    checked by name, so their log-probs are trusted only as far as their tokens match the targets."""
    return _teacher_tokenizer(spec, tokenizer, cache)[1]


MAX_TOKEN_MISMATCH = 0.03  # KD refuses above this fraction of checked records whose answer tokens differ


def check_teacher_tokens(examples: list, tokenizer: Any, max_length: int | None = None) -> dict:
    """Round-trip check: does the student's chat template reproduce the tokens the teacher generated?

    For every example whose record carries `answer_token_ids` (hf teachers) from a teacher with the student's
    tokenizer, the answer's target tokens (the final assistant turn, end-of-turn marker excluded) must equal those ids.
    Where the text is the same but its tokens are not (a real model often samples a tokenization that re-tokenizing
    its text does not give back: 8% of SmolLM2-135M's greedy answers in examples/smollm2.toml), the teacher's ids
    replace the student's in the example (`retokenized`): the trained tokens are then the ones the teacher wrote.
    What is left is a mismatch: the trained text is not what the teacher wrote (a separator the template adds, a
    template that rewrites the answer, special tokens dropped from the text); CE can still learn it, but the teacher's
    logits on a sequence it would never write pull a KD student away from it.
    Returns {"checked", "mismatched", "retokenized", "unchecked" (other or unavailable tokenizer), "first"
    ("file:line" ...)}.
    """
    report: dict[str, Any] = {"checked": 0, "mismatched": 0, "retokenized": 0, "unchecked": 0, "first": []}
    cache: dict = {}
    for ex in examples:
        if ex.answer_token_ids is None:
            continue
        if not _same_tokenizer(ex.teacher, tokenizer, cache):
            report["unchecked"] += 1
            continue
        report["checked"] += 1
        got = [t for t in _final_run(ex.labels) if t != IGNORE]
        want = list(ex.answer_token_ids)
        n = min(len(want), len(got))  # a record truncated by --max-length is compared as far as it goes
        if got[:n] == want[:n]:
            continue
        if _use_teacher_ids(ex, tokenizer, got, want, max_length):
            report["retokenized"] += 1
            continue
        report["mismatched"] += 1
        if len(report["first"]) < 3:
            report["first"].append(f"{ex.where} (teacher {tokenizer.decode(want[:n])!r}, "
                                   f"student template {tokenizer.decode(got[:n])!r})")
    report["mismatch_fraction"] = report["mismatched"] / report["checked"] if report["checked"] else 0.0
    return report


def _use_teacher_ids(ex: Any, tokenizer: Any, got: list[int], want: list[int], max_length: int | None) -> bool:
    """Put the teacher's answer ids in place of the student's tokens of the same text (see check_teacher_tokens).

    got: the final assistant turn's target tokens (answer, then the template's end-of-turn tokens). The student's
    answer is the shortest prefix of `got` that decodes to the teacher's text; what follows it (the end-of-turn
    marker) stays. False when no prefix decodes to it (the texts differ) or the result would pass max_length."""
    text = tokenizer.decode(want)
    k = next((k for k in range(1, len(got)) if tokenizer.decode(got[:k]) == text), None)
    if k is None:
        return False
    final = _final_run(ex.labels)
    first = next(t for t, x in enumerate(final) if x != IGNORE)  # label position of the answer's first token
    start = first + 1  # its input position
    ids = ex.input_ids[:start] + want + ex.input_ids[start + k :]
    if max_length is not None and len(ids) > max_length:
        return False
    from imitate.train.data import shift_targets

    mask = [False] * len(ids)
    for t in range(start, start + len(want) + len(got) - k):
        mask[t] = True
    for t, x in enumerate(ex.labels[:first]):  # earlier assistant turns (--loss-on all) keep their targets
        if x != IGNORE:
            mask[t + 1] = True
    ex.input_ids, ex.labels = ids, shift_targets(ids, mask)
    return True


def _same_tokenizer(spec: str | None, tokenizer: Any, cache: dict) -> bool:
    """Whether the record's teacher is an hf model at hand whose tokenizer is the student's."""
    at_hand, why = _teacher_tokenizer(spec, tokenizer, cache)
    return at_hand and why is None


def refuse_token_mismatch(report: dict) -> None:
    """Logit KD on text the teacher did not write: refuse above MAX_TOKEN_MISMATCH, with the fix."""
    if report["checked"] and report["mismatch_fraction"] > MAX_TOKEN_MISMATCH:
        raise InputError(
            f"{report['mismatched']} of {report['checked']} records from an hf teacher do not tokenize back to the "
            f"tokens the teacher generated ({report['mismatch_fraction']:.0%}; first: {'; '.join(report['first'])}): "
            "KD would score the teacher on text it never wrote",
            hint="give the student the teacher's chat template (--chat-template FILE, the teacher's template as a Jinja "
            "file), or re-collect with a teacher whose template matches the student's; SFT without --teacher is "
            "less affected",
        )


def prepare_graybox(examples: list, tokenizer: Any) -> dict:
    """Align every example's collected logprobs with its targets (sets `Example.topk`, drops `Example.logprobs`).

    Returns the report for the summary: records with logprobs, aligned / unaligned target tokens, refused teachers.
    A record's token is aligned while the collected tokens match the tokenized answer (ids, else token strings); the
    first mismatch ends its alignment and the rest of that answer trains on CE only.
    """
    import torch

    from imitate.train import vocab

    report = {"records_with_logprobs": 0, "aligned": 0, "unaligned": 0, "unmapped_top": 0, "refused": {}}
    cache: dict = {}
    for ex in examples:
        if not ex.logprobs:
            continue
        report["records_with_logprobs"] += 1
        labels = torch.tensor(_final_run(ex.labels))
        why = _teacher_tokenizer_ok(ex.teacher, tokenizer, cache)
        if why is not None:
            report["refused"][ex.teacher] = why
            report["unaligned"] += int((labels != IGNORE).sum())
            ex.logprobs = None
            continue
        ids, lps, counts = vocab.align_logprobs(ex.logprobs, labels, tokenizer)
        ex.logprobs = None
        for k in ("aligned", "unaligned", "unmapped_top"):
            report[k] += counts[k]
        rows = (ids >= 0).any(-1).nonzero().squeeze(-1)
        if rows.numel():
            a, b = int(rows[0]), int(rows[-1]) + 1
            ex.topk = (a, ids[a:b].clone(), lps[a:b].clone())
    total = report["aligned"] + report["unaligned"]
    report["aligned_fraction"] = report["aligned"] / total if total else 0.0
    if report["records_with_logprobs"] and not report["aligned"]:
        report["note"] = ("no collected log-prob could be aligned with the student's tokens (another tokenizer?): "
                          "trained on CE only")
    return report


def graybox_tensors(examples: list, batch: dict) -> tuple[Any, Any]:
    """[B, L, K] top-K ids (-1 = none) and log-probs for a collated micro-batch (padded rows or one packed row)."""
    import torch

    width = max((ex.topk[1].shape[1] for ex in examples if ex.topk is not None), default=1)
    rows = batch["input_ids"].shape[0]
    length = batch["input_ids"].shape[1]
    ids = torch.full((rows, length, width), -1, dtype=torch.long)
    lps = torch.zeros((rows, length, width), dtype=torch.float32)
    packed = "position_ids" in batch and "attention_mask" not in batch
    offset = 0
    for r, ex in enumerate(examples):
        row, base = (0, offset) if packed else (r, 0)
        if ex.topk is not None:
            a, t_ids, t_lps = ex.topk
            ids[row, base + a : base + a + t_ids.shape[0], : t_ids.shape[1]] = t_ids
            lps[row, base + a : base + a + t_ids.shape[0], : t_lps.shape[1]] = t_lps
        offset += len(ex.input_ids)
    return ids, lps


# ---------------------------------------------------------------------------------------------------------------------
# weights and the per-micro-batch terms
# ---------------------------------------------------------------------------------------------------------------------


def load_teacher(cfg: Any, plan: Plan, device: Any) -> Any:
    """The frozen teacher: eval mode, no parameter requires grad, on `--teacher-device` (default: the student's)."""
    from imitate.models import load_weights

    model = load_weights(  # dtype "auto": bf16/fp16 on CUDA, float32 on CPU
        plan.teacher, device=str(cfg.teacher_device or device), dtype=cfg.teacher_dtype,
        trust_remote_code=cfg.trust_remote_code,
    )
    model.requires_grad_(False)  # load_weights already put it in eval mode
    model.config.use_cache = False
    return model


def unwrap(model: Any) -> Any:
    """The transformers model under the DDP and peft wrappers."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the model under the DDP/peft wrappers accepts `logits_to_keep` (transformers' own models do)."""
    return _forward_takes(type(unwrap(model)), "logits_to_keep")


@functools.cache
def _forward_takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


class Distiller:
    """Computes the loss terms of one micro-batch and knows their weights.

    teacher: the frozen model or None (gray-box); regressors: `FeatureRegressors` or None.
    """

    def __init__(self, cfg: Any, plan: Plan, teacher: Any = None, regressors: Any = None,
                 end_ids: Sequence[int] = ()):
        from imitate.train.losses import DIVERGENCES

        self.cfg, self.plan, self.teacher, self.regressors = cfg, plan, teacher, regressors
        self.end_ids = list(end_ids)  # the student's end-of-turn ids: no KD on what its template writes after them
        self.gate = None  # an `SCKDGate` with --sckd (see `setup`)
        self._counts: Any = None  # sckd.OnRates, made on the first logged step
        self.beta = cfg.jsd_beta if cfg.kd == "jsd" else DIVERGENCES[cfg.kd]
        self.w = cfg.kd_weight

    @property
    def terms(self) -> list[str]:
        return list(self.plan.terms)

    def weights(self) -> dict[str, float]:
        """λ of each KD term (CE's weight is 1 − w)."""
        return {name: (self.w if name in (LOGIT, GRAYBOX, ONPOLICY) else self.cfg.feature_weight)
                for name in self.plan.terms}

    def combine(self, terms: dict) -> Any:
        """The objective as token sums: (1 − w)·CE + Σ λ_i·term_i."""
        total = terms["ce"] * (1.0 - self.w)
        for name, lam in self.weights().items():
            total = total + terms[name] * lam
        return total

    def losses(self, model: Any, batch: dict) -> dict:
        """{"ce": sum, term: sum, ...} for one micro-batch (labels are already next-token aligned by the collator).

        An on-policy micro-batch (`onpolicy.OnPolicy.batch`) gives only its `onpolicy_kd` term, on the student's own
        tokens; its "ce" is the CE of the same prompts' collected answers when --sckd pairs them, else 0."""
        from imitate.train import losses

        labels = batch["labels"]
        chunk, vocab_size = self.cfg.kd_chunk_size, self.plan.vocab_size
        if "onpolicy" in batch:
            hidden, head = self._student(model, batch)
            kd = self._logit_kd(hidden, head, self._teacher(batch), labels)
            zero = kd.new_zeros(())
            terms = {"ce": zero, **{name: zero for name in self.terms}, ONPOLICY: kd}
            if "reference" in batch:  # SCKD's paired CE: the same prompts' collected answers (onpolicy.py)
                terms["ce"] = losses.forward_ce(model, batch["reference"], vocab_size=vocab_size, chunk_size=chunk)[0]
            return terms
        ce, out = losses.forward_ce(model, batch, vocab_size=vocab_size, chunk_size=chunk)  # the same CE as SFT's
        terms = {"ce": ce}
        hidden = out.hidden_states
        head = unwrap(model).get_output_embeddings()
        if self.teacher is not None:
            t_out = self._teacher(batch)
            taught = teacher_written(batch["input_ids"], labels, self.end_ids)  # not the template's text after a turn
            terms[LOGIT] = self._logit_kd(hidden, head, t_out, taught)
            if self.regressors is not None:
                for name, (s, _) in self.regressors.terms(hidden, t_out.hidden_states, taught != IGNORE).items():
                    terms[name] = s
            if ONPOLICY in self.plan.terms:
                terms[ONPOLICY] = terms["ce"].new_zeros(())
        elif GRAYBOX in self.plan.terms:
            terms[GRAYBOX] = losses.sparse_topk_kd(hidden[-1], head, batch["topk_ids"], batch["topk_logprobs"],
                                                   chunk_size=chunk, vocab_size=vocab_size)[0]
        return terms

    def _student(self, model: Any, batch: dict) -> tuple[Any, Any]:
        """(the student's hidden states, its output head) for a micro-batch."""
        # logits_to_keep=1: the models build no [tokens x vocab] logits; the losses project hidden states in chunks
        extra = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
        out = model(**model_inputs(batch), **extra, output_hidden_states=True, use_cache=False)
        return out.hidden_states, unwrap(model).get_output_embeddings()

    def _teacher(self, batch: dict) -> Any:
        """The frozen teacher's outputs (hidden states) on the same micro-batch, under no_grad."""
        import torch

        t_dev = self.teacher.device
        t_extra = {"logits_to_keep": 1} if takes_logits_to_keep(self.teacher) else {}
        with torch.no_grad():
            return self.teacher(**{k: v.to(t_dev) for k, v in model_inputs(batch).items()}, **t_extra,
                                output_hidden_states=True, use_cache=False)

    def _logit_kd(self, hidden: Any, head: Any, t_out: Any, labels: Any) -> Any:
        from imitate.train import losses

        return losses.chunked_kd_loss(
            hidden[-1], head, t_out.hidden_states[-1], self.teacher.get_output_embeddings(), labels, beta=self.beta,
            temperature=self.cfg.temperature, chunk_size=self.cfg.kd_chunk_size, vocab_size=self.plan.vocab_size,
            t2=self.cfg.t2)[0]

    def log(self, row: dict, per_token: list[float], gates: dict, rows: list[dict]) -> None:
        """Add this step's terms (per target token, unweighted) and gates (cosine, on/off, running on-rate since step 1,
        earlier rows of a resumed run included) to the metrics row."""
        row.update(zip(self.terms, per_token))
        for name, g in gates.items():
            row[f"cos/{name}"], row[f"on/{name}"] = g["cos"], g["on"]
        if self._counts is None:  # from the rows a resumed run restored
            from imitate.train.sckd import OnRates

            self._counts = OnRates.from_rows(rows, self.terms)
        for name, g in gates.items():
            row[f"on_rate/{name}"] = self._counts.add(name, g["on"])

    def summary(self, rows: list[dict]) -> dict:
        """The distillation part of the run summary; on-rates from the logged gates (whole run, resumed ones too)."""
        cfg = self.cfg
        out: dict[str, Any] = {"mode": "logit" if self.teacher is not None else "graybox", "terms": self.terms,
                               "kd_weight": self.w}
        if self.teacher is not None:
            out.update(teacher=cfg.teacher, kd=cfg.kd, temperature=cfg.temperature, t2=cfg.t2,
                       vocab_size=self.plan.vocab_size)
            if cfg.kd == "jsd":
                out["jsd_beta"] = cfg.jsd_beta
            if self.plan.pairs:
                out.update(feature_pairs=[list(p) for p in self.plan.pairs], feature_weight=cfg.feature_weight)
        else:
            out["graybox"] = self.plan.graybox
        if cfg.sckd:
            out["sckd_threshold"] = cfg.sckd_threshold
            out["on_rate"] = on_rates(rows, self.terms)
        return out


def setup(cfg: Any, plan: Plan, accelerator: Any, params: list, end_ids: Sequence[int] = ()) -> Distiller:
    """Load the teacher, make the feature regressors (trained by the student's optimizer, checkpointed with it, saved
    beside the output) and, with --sckd, the gate over the student's trainable `params`. end_ids: the student's
    end-of-turn token ids (`models.eos_ids`); the KD terms skip what the chat template writes after them."""
    teacher = load_teacher(cfg, plan, accelerator.device) if plan.teacher else None
    regressors = None
    if plan.pairs:
        from imitate.train.features import FeatureRegressors

        regressors = FeatureRegressors(plan.pairs, plan.student_width, plan.teacher_width).to(accelerator.device)
        accelerator.register_for_checkpointing(regressors)
    distiller = Distiller(cfg, plan, teacher, regressors, end_ids)
    if cfg.sckd:
        from imitate.train.sckd import SCKDGate, distributed_sum

        own = {n: list(regressors.maps[n].parameters()) for n in distiller.terms
               if regressors is not None and n in regressors.maps}
        # CE is weighed (1 - w) because the logit / gray-box term takes w: when that term is off, CE gets w back
        back = {n: distiller.w / (1.0 - distiller.w) for n in distiller.terms if n in (LOGIT, GRAYBOX, ONPOLICY)}
        distiller.gate = SCKDGate(params, distiller.weights(), threshold=cfg.sckd_threshold, term_params=own,
                                  reducer=distributed_sum(), give_back=back,
                                  pairs={ONPOLICY: "onpolicy"})  # see onpolicy.py
    return distiller


def on_rates(rows: list[dict], names: list[str]) -> dict[str, float]:
    """Fraction of logged optimizer steps in which each term's gate was on."""
    from imitate.train.sckd import OnRates

    return OnRates.from_rows(rows, names).rates()


def average_grads(accelerator: Any, params: list) -> None:
    """Average `.grad` over data-parallel ranks (one flat all-reduce) for gradients DDP did not synchronise."""
    import torch

    if accelerator.num_processes == 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    flat = accelerator.reduce(flat, reduction="mean")
    k = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[k : k + n].view_as(p.grad))
        k += n
