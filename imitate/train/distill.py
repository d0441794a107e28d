"""Distillation inside `imitate train`: the teacher, the KD loss terms of one micro-batch, the SCKD gate's wiring.

Three sources of teacher signal, one loss convention (token SUMS, divided by the window's target-token count in
train.py exactly like the cross-entropy):
- logit KD (`--teacher hf:...`): the frozen teacher runs under no_grad on the same micro-batch; the term is
  T² · Σ_tokens D(teacher_T, student_T) over target (assistant) tokens, computed chunk by chunk from the two models'
  final hidden states and output heads (`losses.chunked_kd_loss`), so [tokens × vocab] logits never exist whole.
  A teacher with another tokenizer reads its own tokenization of the conversation instead, and the term is taken at
  the positions where both tokenizations of the answer start a token (`xtok.py`, `xtok_loss.xtok_kd_loss`).
- feature KD (`--feature-kd`): per (student layer, teacher layer) pair, MSE between a learned linear map of the
  student's hidden state and the teacher's, over target tokens (`features.FeatureRegressors`; trained with the student).
- gray-box KD (records with collected top-K `logprobs`, no `--teacher`): `losses.sparse_topk_kd` against the collected
  log-probabilities, aligned to the tokenized examples once, at data preparation (`teacher_tokens.prepare_graybox`).
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

from imitate.errors import ImitateError, UsageError
from imitate.train.data import IGNORE, model_inputs, teacher_written

LOGIT = "logit_kd"
GRAYBOX = "graybox_kd"
ONPOLICY = "onpolicy_kd"  # logit KD on the student's own answers (imitate/train/onpolicy.py)


def check_options(cfg: Any) -> None:
    """The teacher reference resolves (a local path exists), before anything is loaded; TrainConfig checked the rest."""
    for spec in cfg.teachers:
        teacher_ref(spec)


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
    teachers: list[str] = field(default_factory=list)  # every teacher's reference (several: imitate/train/teachers.py)
    vocab_size: int | None = None  # real vocabulary: logits are cut to it
    pairs: list[tuple[int, int]] = field(default_factory=list)  # feature KD (student layer, teacher layer)
    student_width: int = 0
    teacher_width: int = 0
    graybox: dict | None = None  # the gray-box report (counts, notes), None when gray-box is not used
    xtok: Any = None  # `xtok.WhiteBox` when the teacher's tokenizer is not the student's (cross-tokenizer KD)
    terms: list[str] = field(default_factory=list)  # KD term names, in order
    tokenizer: Any = None  # the white-box teacher's tokenizer: its chat template renders records' context + messages


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
    from imitate.train.teachers import term_names

    refs, confs, toks = [], [], []
    s_conf = _configs(student, cfg.trust_remote_code)
    for spec in cfg.teachers:
        ref = teacher_ref(spec)
        base, _, tok_dir = model_refs(ref)
        confs.append(_configs(base, cfg.trust_remote_code))
        try:
            t_tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ImitateError(f"cannot load the tokenizer of teacher {spec}: {str(exc).splitlines()[0]}") from None
        try:
            vocab.check_tokenizers(tokenizer, t_tok, teacher=f"teacher {spec}")
        except ImitateError as exc:
            if len(cfg.teachers) > 1:  # several teachers: each must share the student's tokenizer
                raise
            # one teacher with another tokenizer: KD by text alignment (imitate/train/xtok.py)
            return _cross_plan(cfg, ref, tokenizer, t_tok, s_conf, confs[0], exc.message)
        refs.append(ref)
        toks.append(t_tok)
    t_conf = confs[0]
    plan = Plan(teacher=refs[0], teachers=refs, student_width=s_conf.hidden_size, teacher_width=t_conf.hidden_size,
                tokenizer=toks[0])
    plan.vocab_size = min(vocab.real_vocab_size(tokenizer, s_conf.vocab_size, c.vocab_size) for c in confs)
    if cfg.feature_kd:
        plan.pairs = features.parse_pairs(cfg.feature_kd, s_conf.num_hidden_layers, t_conf.num_hidden_layers)
    plan.terms = term_names(cfg) + [features.term_name(p) for p in plan.pairs] + ([ONPOLICY] if cfg.on_policy else [])
    return plan


def _cross_plan(cfg: Any, ref: str, tokenizer: Any, t_tok: Any, s_conf: Any, t_conf: Any, why: str) -> Plan:
    """The plan of a teacher with another tokenizer: one logit term on the positions where both tokenizations of an
    answer start a token (xtok.py), the teacher reading the conversation in its own chat template."""
    from imitate.train import vocab, xtok

    for flag, on in (("--feature-kd", cfg.feature_kd), ("--on-policy", cfg.on_policy)):
        if on:
            raise UsageError(
                f"{flag} needs a teacher that shares the student's tokenizer ({why})",
                hint=f"drop {flag}: cross-tokenizer KD aligns the two models' output distributions by text, "
                "not their hidden states or the student's own samples")
    note = {}
    if not getattr(t_tok, "chat_template", None):
        t_tok.chat_template = tokenizer.chat_template
        note["teacher_template"] = "the teacher's tokenizer has no chat template: it reads the student's"
    plan = Plan(teacher=ref, teachers=[ref], student_width=s_conf.hidden_size, teacher_width=t_conf.hidden_size,
                terms=[LOGIT])
    plan.vocab_size = vocab.real_vocab_size(tokenizer, s_conf.vocab_size, s_conf.vocab_size)
    t_size = vocab.real_vocab_size(t_tok, t_conf.vocab_size, t_conf.vocab_size)
    plan.xtok = xtok.WhiteBox(tokenizer=t_tok, vocab_size=t_size, why=why, report=note)
    return plan


def graybox_plan(tokenizer: Any, student: str, report: dict, trust_remote_code: bool) -> Plan:
    """The plan of a gray-box run: one sparse KD term, logits cut to the real vocabulary."""
    from imitate.train import vocab

    s_conf = _configs(student, trust_remote_code)
    size = vocab.real_vocab_size(tokenizer, s_conf.vocab_size, s_conf.vocab_size)
    return Plan(vocab_size=size, student_width=s_conf.hidden_size, graybox=report, terms=[GRAYBOX])


# ---------------------------------------------------------------------------------------------------------------------
# weights and the per-micro-batch terms
# ---------------------------------------------------------------------------------------------------------------------


def load_teacher(cfg: Any, plan: Plan, device: Any, ref: str | None = None) -> Any:
    """A frozen teacher (default the first): eval mode, no parameter requires grad, on `--teacher-device` (default:
    the student's). Each teacher is loaded once, for the whole run."""
    from imitate.models import load_weights

    model = load_weights(  # dtype "auto": bf16/fp16 on CUDA, float32 on CPU
        ref or plan.teacher, device=str(cfg.teacher_device or device), dtype=cfg.teacher_dtype,
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

    teacher: the frozen model or None (gray-box); regressors: `FeatureRegressors` or None; teachers: every frozen
    teacher when there are several (teacher is the first of them).
    """

    def __init__(self, cfg: Any, plan: Plan, teacher: Any = None, regressors: Any = None,
                 end_ids: Sequence[int] = (), teachers: Sequence[Any] = ()):
        from imitate.train.losses import DIVERGENCES
        from imitate.train.teachers import shares

        self.cfg, self.plan, self.teacher, self.regressors = cfg, plan, teacher, regressors
        self.teachers = list(teachers) or ([teacher] if teacher is not None else [])
        self.shares = shares(cfg) if len(self.teachers) > 1 else [1.0]
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
        from imitate.train.teachers import is_logit

        per_teacher = {}  # separate terms of several teachers: w times each one's share
        if len(self.teachers) > 1 and self.cfg.teacher_mix == "separate":
            per_teacher = dict(zip(self.plan.terms[: len(self.teachers)], self.shares))
        return {name: (self.w * per_teacher.get(name, 1.0) if is_logit(name) or name in (GRAYBOX, ONPOLICY)
                       else self.cfg.feature_weight) for name in self.plan.terms}

    def combine(self, terms: dict) -> Any:
        """The objective as token sums: (1 − w)·CE + Σ λ_i·term_i."""
        total = terms["ce"] * (1.0 - self.w)
        for name, lam in self.weights().items():
            total = total + terms[name] * lam
        return total

    def losses(self, model: Any, batch: dict) -> dict:
        """{"ce": sum, term: sum, ...} for one micro-batch (labels are already next-token aligned by the collator).

        An on-policy micro-batch (`onpolicy.OnPolicy.batch`) gives only its `onpolicy_kd` term, on the student's own
        tokens; its "ce" is the CE of the same prompts' collected answers with --sckd (paired) or --on-policy-ce,
        else 0."""
        from imitate.train import losses

        labels = batch["labels"]
        chunk, vocab_size = self.cfg.kd_chunk_size, self.plan.vocab_size
        if "onpolicy" in batch:
            hidden, head = self._student(model, batch)
            t_out = batch.get("teacher_out") or self._teacher(batch)  # `teacher_view` may have run the teacher already
            kd = self._logit_kd(hidden, head, t_out, labels)
            zero = kd.new_zeros(())
            terms = {"ce": zero, **{name: zero for name in self.terms}, ONPOLICY: kd}
            if "reference" in batch:  # SCKD's paired CE: the same prompts' collected answers (onpolicy.py)
                terms["ce"] = losses.forward_ce(model, batch["reference"], vocab_size=vocab_size, chunk_size=chunk)[0]
            return terms
        ce, out = losses.forward_ce(model, batch, vocab_size=vocab_size, chunk_size=chunk)  # the same CE as SFT's
        terms = {"ce": ce}
        hidden = out.hidden_states
        head = unwrap(model).get_output_embeddings()
        if self.plan.xtok is not None:
            terms[LOGIT] = self._xtok_kd(hidden, head, batch)
        elif len(self.teachers) > 1:
            taught = teacher_written(batch["input_ids"], labels, self.end_ids)
            terms.update(self._team_kd(hidden, head, batch, taught))
        elif self.teacher is not None:
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

    def teacher_view(self, batch: dict) -> tuple[Any, Any, int]:
        """(the teacher's last hidden layer at the student's positions, its output head, the vocabulary size) for an
        on-policy micro-batch. The pass is kept in batch["teacher_out"], so `losses` reuses it instead of running the
        teacher again (onpolicy.cut_implausible reads the teacher's distributions before the loss)."""
        from types import SimpleNamespace

        last = self._teacher(batch).hidden_states[-1]  # the only layer the on-policy KD term reads
        batch["teacher_out"] = SimpleNamespace(hidden_states=(last,))
        return last, self.teacher.get_output_embeddings(), self.plan.vocab_size

    def _student(self, model: Any, batch: dict) -> tuple[Any, Any]:
        """(the student's hidden states, its output head) for a micro-batch."""
        # logits_to_keep=1: the models build no [tokens x vocab] logits; the losses project hidden states in chunks
        extra = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
        out = model(**model_inputs(batch), **extra, output_hidden_states=True, use_cache=False)
        return out.hidden_states, unwrap(model).get_output_embeddings()

    def _teacher(self, batch: dict, teacher: Any = None) -> Any:
        """A frozen teacher's outputs (hidden states; default the first teacher) on the same micro-batch, under
        no_grad. Records with context bring the teacher's own rows (`batch["teacher"]`, context + messages); its hidden
        states are then moved to the student's target positions (imitate.train.context.realign)."""
        import torch

        teacher = teacher or self.teacher
        t_dev = teacher.device
        t_extra = {"logits_to_keep": 1} if takes_logits_to_keep(teacher) else {}
        inputs = model_inputs(batch["teacher"] if "teacher" in batch else batch)
        with torch.no_grad():
            out = teacher(**{k: v.to(t_dev) for k, v in inputs.items()}, **t_extra,
                          output_hidden_states=True, use_cache=False)
        if "teacher" not in batch:
            return out
        from imitate.train.context import realign

        return realign(out, batch)

    def _xtok_kd(self, hidden: Any, head: Any, batch: dict) -> Any:
        """The cross-tokenizer KD term: the teacher reads its own tokens (`xtok.batch_tensors`) under no_grad."""
        import torch

        from imitate.train.xtok_loss import xtok_kd_loss

        if not batch["xtok_s_index"].numel():  # no shared boundary in this micro-batch (or a padding one)
            return hidden[-1].new_zeros((), dtype=torch.float32)
        t_dev = self.teacher.device
        extra = {"logits_to_keep": 1} if takes_logits_to_keep(self.teacher) else {}
        with torch.no_grad():
            t_out = self.teacher(input_ids=batch["xtok_input_ids"].to(t_dev),
                                 attention_mask=batch["xtok_attention_mask"].to(t_dev), **extra,
                                 output_hidden_states=True, use_cache=False)
        x = self.plan.xtok
        return xtok_kd_loss(
            hidden[-1], head, t_out.hidden_states[-1], self.teacher.get_output_embeddings(), batch["xtok_s_index"],
            batch["xtok_t_index"], batch["xtok_s_star"], batch["xtok_t_star"], x.t_map, beta=self.beta,
            temperature=self.cfg.temperature, chunk_size=self.cfg.kd_chunk_size, vocab_size=self.plan.vocab_size,
            teacher_vocab_size=x.vocab_size, t2=self.cfg.t2)[0]

    def _logit_kd(self, hidden: Any, head: Any, t_out: Any, labels: Any, teacher: Any = None) -> Any:
        from imitate.train import losses

        return losses.chunked_kd_loss(
            hidden[-1], head, t_out.hidden_states[-1], (teacher or self.teacher).get_output_embeddings(), labels,
            beta=self.beta, temperature=self.cfg.temperature, chunk_size=self.cfg.kd_chunk_size,
            vocab_size=self.plan.vocab_size, t2=self.cfg.t2)[0]

    def _team_kd(self, hidden: Any, head: Any, batch: dict, taught: Any) -> dict:
        """Several teachers: one term per teacher (in plan.terms order), or one against their mean distribution."""
        from imitate.train.teachers import mixture_kd_loss

        if self.cfg.teacher_mix == "separate":  # one teacher's outputs at a time: only its target rows are kept
            return {name: self._logit_kd(hidden, head, self._teacher(batch, t), taught, t)
                    for name, t in zip(self.plan.terms, self.teachers)}
        outs = [(self._teacher(batch, t).hidden_states[-1], t.get_output_embeddings(), share)
                for t, share in zip(self.teachers, self.shares)]
        return {LOGIT: mixture_kd_loss(hidden[-1], head, outs, taught, beta=self.beta, temperature=self.cfg.temperature,
                                       chunk_size=self.cfg.kd_chunk_size, vocab_size=self.plan.vocab_size,
                                       t2=self.cfg.t2)[0]}

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
            if len(self.teachers) > 1:
                from imitate.train.teachers import names

                out.update(teacher_names=names(cfg.teachers), teacher_shares=[round(x, 6) for x in self.shares],
                           teacher_mix=cfg.teacher_mix)
            if cfg.kd == "jsd":
                out["jsd_beta"] = cfg.jsd_beta
            if self.plan.pairs:
                out.update(feature_pairs=[list(p) for p in self.plan.pairs], feature_weight=cfg.feature_weight)
            if self.plan.xtok is not None:  # cross-tokenizer: what differs, and how much of the answers it grades
                out.update(cross_tokenizer=self.plan.xtok.why, coverage=self.plan.xtok.report)
        else:
            out["graybox"] = self.plan.graybox
            out["coverage"] = {k: self.plan.graybox[k] for k in ("coverage", "taught_tokens", "answer_tokens",
                                                                  "records", "per_record") if k in self.plan.graybox}
        if cfg.sckd:
            out["sckd_threshold"] = cfg.sckd_threshold
            out["on_rate"] = on_rates(rows, self.terms)
        return out


def setup(cfg: Any, plan: Plan, accelerator: Any, params: list, end_ids: Sequence[int] = ()) -> Distiller:
    """Load the teacher, make the feature regressors (trained by the student's optimizer, checkpointed with it, saved
    beside the output) and, with --sckd, the gate over the student's trainable `params`. end_ids: the student's
    end-of-turn token ids (`models.eos_ids`); the KD terms skip what the chat template writes after them."""
    teachers = [load_teacher(cfg, plan, accelerator.device, ref) for ref in plan.teachers]  # once, no grad
    teacher = teachers[0] if teachers else None
    regressors = None
    if plan.pairs:
        from imitate.train.features import FeatureRegressors

        regressors = FeatureRegressors(plan.pairs, plan.student_width, plan.teacher_width).to(accelerator.device)
        accelerator.register_for_checkpointing(regressors)
    distiller = Distiller(cfg, plan, teacher, regressors, end_ids, teachers)
    if cfg.sckd:
        from imitate.train.sckd import SCKDGate, distributed_sum

        own = {n: list(regressors.maps[n].parameters()) for n in distiller.terms
               if regressors is not None and n in regressors.maps}
        # CE is weighed (1 - w) because the logit / gray-box term takes w: when that term is off, CE gets w back
        from imitate.train.teachers import is_logit

        lam = distiller.weights()  # several teachers: each gives back its own share of w
        back = {n: lam[n] / (1.0 - distiller.w) for n in distiller.terms if is_logit(n) or n in (GRAYBOX, ONPOLICY)}
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
