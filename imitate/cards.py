"""Model and dataset cards: `README.md` files with YAML front matter, as the Hugging Face Hub reads them
(`huggingface_hub.ModelCard.load` / `DatasetCard.load`).

Every trained output gets `OUT/README.md`: the teacher, the student base (and, for a student cut by
`imitate init-student`, which teacher layers it kept), the data files with their sha256 and record counts, what
`imitate clean` removed, the collection cost, the training options (KD, temperature, SCKD on-rates), eval scores
(added by `imitate eval` when it scores that output) and the command that reproduces the run. `imitate clean` writes
a dataset card beside its output: `CLEAN_STEM.README.md` (rename it to README.md when pushing the file to the Hub).

Everything the card says lives in its front matter under `imitate:`; the Markdown body is rendered from it, so a card
can be updated (eval scores) by editing that dict and rendering again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from imitate.collect.pricing import cost, prices_for

TAGS = ["imitate", "distillation", "knowledge-distillation"]


# ------------------------------------------------------------------------------------------------ reading and writing


def read_card(path: str | Path) -> tuple[dict, str]:
    """(front matter, body) of a card file; ({}, text) when it has no front matter."""
    text = Path(path).read_text(encoding="utf-8")
    if text.startswith("---\n"):
        head, sep, body = text[4:].partition("\n---\n")
        if sep:
            return yaml.safe_load(head) or {}, body
    return {}, text


def write_card(path: str | Path, front: dict, body: str) -> Path:
    path = Path(path)
    head = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=1000)
    path.write_text(f"---\n{head}---\n\n{body.strip()}\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ facts about files


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_facts(rec: Any) -> tuple[str | None, int, int]:
    """(teacher, input tokens, output tokens) of one parsed line of a records file, as `data_facts` counts them."""
    if not isinstance(rec, dict):
        return None, 0, 0
    t = rec.get("teacher")
    t = t if isinstance(t, str) else None
    usage = rec.get("usage")
    if not isinstance(usage, dict):
        return t, 0, 0
    return t, int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)


Counted = tuple[int, dict[str, int], int, int]  # (records, teacher -> records, tokens in, tokens out)


def data_facts(path: str | Path, counted: Counted | None = None) -> dict:
    """sha256, record count, teachers and collection tokens/cost of a records file (no record is validated here).
    counted: the counts, when the caller already has them (`imitate clean` gathers them in its map step); else the
    file is read for them."""
    if counted is None:
        counted = _count(path)
    records, teachers, tokens_in, tokens_out = counted
    costs = [cost(tokens_in, tokens_out, prices_for(t)) for t in teachers]  # per-teacher prices, one teacher usually
    known = None if any(c is None for c in costs) or len(teachers) > 1 else (costs[0] if costs else 0.0)
    return {"path": str(path), "sha256": sha256(path), "records": records, "teachers": teachers,
            "tokens_in": tokens_in, "tokens_out": tokens_out, "cost_usd": known}


def _count(path: str | Path) -> Counted:
    teachers: dict[str, int] = {}
    tokens_in = tokens_out = records = 0
    with open(path, encoding="utf-8", errors="replace") as fh:  # clean --on-bad-line skip passes bad bytes
        for line in fh:
            if not line.strip():
                continue
            records += 1
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            t, n_in, n_out = record_facts(rec)
            if t is not None:
                teachers[t] = teachers.get(t, 0) + 1
            tokens_in += n_in
            tokens_out += n_out
    return records, teachers, tokens_in, tokens_out


def dataset_card_path(clean_out: str | Path) -> Path:
    p = Path(clean_out)
    return p.with_name(p.stem + ".README.md")


def command(name: str, cfg: Any, *, special: dict[str, tuple[str, str]] | None = None) -> str:
    """`imitate NAME --flag value ...` for every option that differs from its default (paths as given)."""
    import shlex

    special = special or {}
    parts = ["imitate", name]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING and value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            on, off = special.get(f.name, (flag, "--no-" + f.name.replace("_", "-")))
            parts.append(on if value else off)
        elif isinstance(value, dict):  # ROLE=N / KEY=VALUE flags, repeated (the flag as the option spells it)
            flag = (f.metadata.get("imitate", {}).get("flag") or flag).split("/")[0]
            for k, v in value.items():
                parts += [flag, shlex.quote(f"{k}={v if isinstance(v, str) else json.dumps(v)}")]
        elif isinstance(value, (list, tuple)):
            for v in value:
                parts += [flag, shlex.quote(str(v))]
        elif value is not None:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _hub_id(ref: str | None) -> str | None:
    """A reference that is a hub id (org/name, not on disk), for the Hub's `base_model` field; else None."""
    if not ref or Path(ref).exists() or ref.count("/") != 1 or ref.startswith((".", "/", "~")):
        return None
    return ref


# ------------------------------------------------------------------------------------------------ dataset card


def write_dataset_card(cfg: Any, summary: dict, counted: dict[str, Counted] | None = None) -> Path:
    """The card of `imitate clean`'s output: its records, where they came from, what was removed and why.
    counted: str(path) -> the counts of that file (output or input), where known; other files are read for them."""
    out = Path(cfg.out)
    counted = counted or {}
    facts = data_facts(out, counted.get(str(out)))
    inputs = [data_facts(p, counted.get(str(p))) for p in cfg.inputs]
    meta = {
        "records": summary["out"],
        "input_records": summary["in"],
        "removed": {k: v for k, v in summary["removed"].items() if v},
        "removed_total": summary["removed_total"],
        "file": facts,
        "inputs": inputs,
        "command": command("clean", cfg),
    }
    sel = summary.get("select")
    if sel:  # which answers were kept among several to one prompt, and by whom (the judge model)
        meta["select"] = {k: v for k, v in sel.items() if k not in ("examples", "notes", "journal")}
    front = {"tags": TAGS + ["synthetic"], "task_categories": ["text-generation"],
             "configs": [{"config_name": "default", "data_files": out.name}], "imitate": meta}
    lines = [f"# {out.name}", "",
             f"{meta['records']} records kept by `imitate clean` from {meta['input_records']} collected "
             f"({meta['removed_total']} removed). Each line is one conversation whose final assistant turn is the "
             "teacher's answer (the imitate record format; loads with `datasets.load_dataset(\"json\")`).", "",
             "| file | records | sha256 | teachers | tokens in / out | cost (USD) |", "|---|---|---|---|---|---|"]
    for f in [facts, *inputs]:
        lines.append(f"| {f['path']} | {f['records']} | `{f['sha256'][:16]}` | "
                     f"{', '.join(f'{t} ({n})' for t, n in f['teachers'].items()) or '-'} | "
                     f"{f['tokens_in']} / {f['tokens_out']} | {_money(f['cost_usd'])} |")
    lines += ["", "## Removed", ""]
    lines += [f"- {k}: {v}" for k, v in meta["removed"].items()] or ["- nothing"]
    if sel:
        how = ("answers whose final answer is their group's majority (`--select agree`)" if sel["mode"] == "agree"
               else f"answers scored by the judge `{sel['judge']}` (`--select judge`, keep {sel['keep']}"
               + (f", score >= {sel['min_judge_score']:g}" if sel.get("min_judge_score") is not None else "") + ")")
        lines += ["", "## Selection", "", f"Among the answers to the same prompt, kept the {how}: "
                  f"{sel['removed']} removed over {sel['groups']} groups."]
    lines += ["", "## Reproduce", "", f"```\n{meta['command']}\n```"]
    return write_card(dataset_card_path(out), front, "\n".join(lines))


# ------------------------------------------------------------------------------------------------ model card


def write_model_card(out: str | Path, cfg: Any, student: str, summary: dict) -> Path:
    """OUT/README.md of a training run (see the module doc); eval scores are added later by `add_eval`."""
    from imitate import gguf_models
    from imitate.students import origin_of

    data = []
    for p in cfg.data:
        facts = data_facts(p)
        card = dataset_card_path(p)
        if card.is_file():  # written by imitate clean: what it removed
            cleaned = read_card(card)[0].get("imitate", {})
            facts["clean"] = {k: cleaned.get(k) for k in ("input_records", "removed", "removed_total")}
            ins = cleaned.get("inputs") or []
            if ins:  # collection cost: the collected files clean read, not only the kept records
                costs = [i.get("cost_usd") for i in ins]
                facts["collection"] = {"tokens_in": sum(i["tokens_in"] for i in ins),
                                       "tokens_out": sum(i["tokens_out"] for i in ins),
                                       "cost_usd": None if None in costs else round(sum(costs), 6)}
        data.append(facts)
    teachers = sorted({t for f in data for t in f["teachers"]})
    distill = summary.get("distill") or {}
    training = {
        "mode": summary.get("mode"), "steps": summary.get("steps"), "train_examples": summary.get("train_examples"),
        "train_loss": summary.get("train_loss"), "eval_loss": summary.get("eval_loss"), "lr": cfg.lr,
        "batch_size": cfg.batch_size, "max_length": cfg.max_length, "seed": cfg.seed,
    }
    if cfg.teacher:
        training.update(kd=cfg.kd, kd_weight=cfg.kd_weight, temperature=cfg.temperature, t2=cfg.t2,
                        feature_kd=cfg.feature_kd, sckd=cfg.sckd)
        if cfg.sckd:
            training.update(sckd_threshold=cfg.sckd_threshold, sckd_on_rate=distill.get("on_rate"))
        if distill.get("teacher_names"):  # several teachers: their names, shares and how they were mixed
            training.update(teacher_names=distill["teacher_names"], teacher_shares=distill["teacher_shares"],
                            teacher_mix=distill["teacher_mix"])
    elif distill.get("mode") not in (None, "none"):
        training.update(kd="graybox (collected top-K logprobs)", kd_weight=cfg.kd_weight, temperature=cfg.temperature)
    coverage = distill.get("coverage") or {}
    if coverage.get("coverage") is not None:  # share of answer tokens a teacher distribution graded (xtok.py)
        per = coverage.get("per_record") or {}
        training["kd_coverage"] = (f"{coverage['coverage']:.1%} of {coverage.get('answer_tokens')} answer tokens"
                                   + (f" (per record: min {per['min']:.0%}, median {per['median']:.0%})" if per else ""))
    if distill.get("cross_tokenizer"):
        training["teacher_tokenizer"] = "another tokenizer, aligned by text: " + distill["cross_tokenizer"]
    meta = {
        "teacher": cfg.teacher,  # white-box KD teacher (None: trained on the records alone)
        "record_teachers": teachers,  # who wrote the answers
        "student": cfg.student,
        "student_origin": origin_of(student),  # imitate init-student: the teacher and the layers it kept
        "student_gguf": gguf_models.source_of(student),
        "data": data,
        "training": training,
        "eval": {},
        "command": command("train", cfg, special={"full": ("--full", "--lora")}),
    }
    front: dict[str, Any] = {"library_name": "transformers" if cfg.full or cfg.merge else "peft",
                             "pipeline_tag": "text-generation", "tags": TAGS}
    base = _hub_id(cfg.student)
    if base:
        front["base_model"] = base
    front["imitate"] = meta
    return write_card(Path(out) / "README.md", front, render_model_card(meta, Path(out).name))


def _money(x: Any) -> str:
    return "unknown (no price for this teacher)" if x is None else f"${x:.4f}"


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def render_model_card(meta: dict, name: str) -> str:
    origin = meta.get("student_origin")
    lines = [f"# {name}", "",
             f"A student trained with imitate by imitation of "
             f"{', '.join(f'`{t}`' for t in meta['record_teachers']) or 'its records'}"
             + (", with white-box distillation from " + ", ".join(
                 f"`{t}`" for t in ([meta["teacher"]] if isinstance(meta["teacher"], str) else meta["teacher"])) + "."
                if meta["teacher"] else "."), "",
             "## Student", "", f"- base: `{meta['student']}`"]
    if origin:
        lines.append(f"- cut from `{origin['teacher']}` by `imitate init-student`: kept decoder layers "
                     f"{origin['kept_layers']} of {origin['teacher_layers']} ({origin['params'] / 1e6:.1f}M of "
                     f"{origin['teacher_params'] / 1e6:.1f}M parameters)")
    gg = meta.get("student_gguf") or (origin or {}).get("gguf")
    if gg:
        lines.append(f"- weights dequantized from the GGUF file `{gg['gguf']}` ({gg['architecture']})")
    lines += ["", "## Data", "", "| file | records | sha256 | removed by clean | collection cost |",
              "|---|---|---|---|---|"]
    for f in meta["data"]:
        clean = f.get("clean")
        removed = (f"{clean['removed_total']} of {clean['input_records']} ("
                   + ", ".join(f"{k} {v}" for k, v in (clean["removed"] or {}).items()) + ")") if clean else "-"
        coll = f.get("collection") or f
        lines.append(f"| {f['path']} | {f['records']} | `{f['sha256'][:16]}` | {removed} | "
                     f"{_money(coll['cost_usd'])} ({coll['tokens_in']} tokens in, {coll['tokens_out']} out) |")
    lines += ["", "## Training", ""] + [f"- {k}: {_num(v) if not isinstance(v, dict) else v}"
                                         for k, v in meta["training"].items() if v is not None]
    lines += ["", "## Evaluation", ""]
    if meta["eval"]:
        lines += ["| prompts | n | score | ROUGE-L vs teacher | NLL of teacher answers (nats/token) |",
                  "|---|---|---|---|---|"]
        for prompts, e in meta["eval"].items():
            lines.append(f"| {prompts} | {e.get('n')} | {_num(e.get('score'))} | {_num(e.get('rouge_l'))} | "
                         f"{_num(e.get('loss'))} |")
    else:
        lines.append("Not evaluated yet (`imitate eval --model THIS_DIRECTORY` adds its scores here).")
    lines += ["", "## Reproduce", "", f"```\n{meta['command']}\n```"]
    return "\n".join(lines)


def add_eval(model_dir: str | Path, summary: dict) -> Path | None:
    """Record an eval's scores in the model card of the directory it scored (an imitate card only)."""
    path = Path(model_dir) / "README.md"
    if not path.is_file():
        return None
    front, _ = read_card(path)
    meta = front.get("imitate")
    if not isinstance(meta, dict) or "training" not in meta:
        return None
    prompts = str((summary.get("config") or {}).get("prompts"))
    meta.setdefault("eval", {})[prompts] = {k: summary.get(k) for k in
                                            ("n", "score", "match", "reference", "agreement", "rouge_l", "loss")}
    return write_card(path, front, render_model_card(meta, Path(model_dir).name))
