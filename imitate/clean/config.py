"""CleanConfig: every option of `imitate clean` (its flag, [clean] TOML key and docs/options.md row come from here)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from imitate.errors import UsageError
from imitate.locks import wait_lock_opt
from imitate.options import Checked, opt

LENGTH_ROLES = ("system", "user", "assistant", "prompt")
GOPHER_TOP_NGRAM = (0.20, 0.18, 0.16)  # n = 2, 3, 4 (Rae et al. 2021, Gopher)
GOPHER_DUP_NGRAM = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # n = 5 .. 10


def role_bounds(values: list[str], flag: str) -> dict[str, int]:
    """`--min-words assistant=3 --min-words prompt=2` -> {"assistant": 3, "prompt": 2}."""
    out: dict[str, int] = {}
    for v in values:
        role, sep, num = v.partition("=")
        if not sep or not num.strip().isdigit():
            raise UsageError(f"{flag} {v!r}: expected ROLE=NUMBER", hint=f"e.g. {flag} assistant=20")
        out[role.strip()] = int(num)
    return out


def key_values(values: list[str], flag: str) -> dict[str, Any]:
    """`--judge-option rpm=60 --judge-option batch=true` -> {"rpm": 60, "batch": True} (values read as JSON, else
    as strings)."""
    out: dict[str, Any] = {}
    for v in values:
        key, sep, raw = v.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {v!r}: expected KEY=VALUE", hint=f"e.g. {flag} rpm=60")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


# collect options a judge run sets itself (what it asks is the records' answers, one sample each)
JUDGE_OWN = ("teacher", "prompts", "out", "template", "n", "self_instruct", "seed_tasks", "cancel", "dry_run")


def _bounds(what: str, example: str) -> object:
    return opt({}, f"{what} per role (assistant = the answer, prompt = every turn before it, user, system); "
               "repeat the flag for more roles; in TOML a table.", example=example, parse=role_bounds,
               metavar="ROLE=N")


@dataclass(frozen=True)
class CleanConfig(Checked):
    # --- inputs and outputs
    inputs: list[Path] = opt([], "Record files written by `imitate collect`, read in this order.",
                             example="records.jsonl more.jsonl", argument=True, metavar="IN.jsonl", input=True,
                             required=True)
    out: Path | None = opt(None, "Kept records (verbatim, input order).", example="clean.jsonl", short="-o",
                           path=True, default_text="required")
    removed: Path | None = opt(None, "Removed records, each with a `removed` key: filter, detail, duplicate_of.",
                               example="removed.jsonl", path=True)
    report: Path | None = opt(None, "The report as JSON: counts, clusters, timing, examples.",
                              example="clean_report.json", path=True)
    wait_lock: float = wait_lock_opt()
    on_bad_line: Literal["error", "skip"] = opt("error", "A malformed line stops the run (error) or is counted and "
                                                "reported (skip).", example="skip")
    engine: Literal["local", "ray"] = opt("local", "Where the map step (parse, filters, MinHash) runs: local (this "
                                          "process or --workers processes) or ray (Ray Data on a cluster or a local "
                                          "Ray; pip install 'imitate[ray]'). Both write the same bytes.", example="ray")
    ray_address: str | None = opt(None, "Ray cluster to attach to with --engine ray (else RAY_ADDRESS; neither: a "
                                  "local Ray with this machine's CPUs).", example="auto", default_text="RAY_ADDRESS")
    workers: int = opt(1, "Processes for parsing, filters and MinHash; 1 runs in-process.", example="4", ge=1)
    chunk_size: int = opt(4000, "Lines per worker task: bigger amortizes numpy calls, smaller balances workers.",
                          example="1000", ge=1)
    examples: int = opt(3, "Removed examples kept per filter in the report.", example="5", ge=0)
    max_removed: float = opt(0.5, "Stop (exit 1, write nothing) when one filter removes more than this share of the "
                             "records: a cleaner that eats most of a dataset is far more often wrong than right; 1 "
                             "allows anything.", example="0.8", ge=0, le=1)
    # --- failed and truncated answers
    drop_failed: bool = opt(True, "Drop records with an `error` field, no final assistant turn or an empty answer.",
                            example="--keep-failed", flag="--drop-failed/--keep-failed")
    drop_truncated: bool = opt(True, "Drop answers with finish_reason length (the teacher hit max_tokens).",
                               example="--keep-truncated", flag="--drop-truncated/--keep-truncated")
    # --- length bounds, per role: "assistant" = the answer, "prompt" = all turns before it, "user", "system"
    min_chars: dict[str, int] = _bounds("Min characters", "assistant=20")
    max_chars: dict[str, int] = _bounds("Max characters", "prompt=8000")
    min_words: dict[str, int] = _bounds("Min words", "assistant=3")
    max_words: dict[str, int] = _bounds("Max words", "assistant=2000")
    min_ratio: float | None = opt(None, "Min answer words / prompt words.", example="0.1", ge=0)
    max_ratio: float | None = opt(None, "Max answer words / prompt words.", example="50", ge=0)
    # --- refusals and boilerplate in the answer (patterns: data/refusals.txt)
    drop_refusals: bool = opt(True, "Drop refusals and boilerplate in the answer.", example="--keep-refusals",
                              flag="--drop-refusals/--keep-refusals")
    default_refusals: bool = opt(True, "Use the shipped refusal list (data/refusals.txt); off: only --refusals files.",
                                 example="--no-default-refusals", flag="--default-refusals/--no-default-refusals")
    refusals: list[Path] = opt([], "Extra phrase/regex files, in the format of data/refusals.txt (repeat).",
                               example="my_refusals.txt", input=True)
    # --- repetition in the answer (Gopher thresholds, see imitate/clean/filters.py)
    drop_repetitive: bool = opt(True, "Gopher repetition filter on the answer.", example="--keep-repetitive",
                                flag="--drop-repetitive/--keep-repetitive")
    repetition_min_words: int = opt(50, "Only answers with at least this many words are checked (the ratios are noise "
                                    "on a few sentences).", example="100", ge=0)
    max_dup_line_frac: float = opt(0.30, "Duplicated lines (and paragraphs) / all lines.", example="0.2",
                                   ge=0, le=1)
    max_dup_line_char_frac: float = opt(0.20, "Characters in duplicated lines (and paragraphs) / all characters.",
                                        example="0.1", ge=0, le=1)
    max_top_ngram_frac: list[float] = opt(list(GOPHER_TOP_NGRAM), "Top 2-, 3-, 4-gram character fractions: give it 3 "
                                          "times.", example="--max-top-ngram-frac 0.2 --max-top-ngram-frac 0.18 "
                                          "--max-top-ngram-frac 0.16")
    max_dup_ngram_frac: list[float] = opt(list(GOPHER_DUP_NGRAM), "Repeated 5- to 10-gram character fractions: give it "
                                          "6 times.", example="--max-dup-ngram-frac 0.15 (6 times)")
    # --- language (only where a light detector, langid or langdetect, is importable; else skipped with a note)
    language: list[str] = opt([], "Keep answers in these ISO 639-1 languages (needs langid or langdetect; repeat).",
                              example="en")
    # --- decontamination against eval sets
    decontaminate: list[Path] = opt([], "Drop records sharing a word n-gram with these eval sets (JSONL rows with "
                                    "prompt/answer/reference fields; repeat).", example="gsm8k_test.jsonl",
                                    input=True)
    decontaminate_ngram: int = opt(13, "Decontamination word n-gram.", example="8", ge=1)
    decontaminate_min_words: int = opt(8, "Eval texts shorter than the n-gram count whole if they have this many "
                                       "words; shorter ones are ignored.", example="5", ge=1)
    # --- exact duplicates: equal after folding case, whitespace and Unicode forms (NFKC); digits and punctuation count
    exact_dedup: bool = opt(True, "Drop records equal to an earlier one, every turn with its role, after folding case, "
                            "whitespace and Unicode forms (NFKC); digits and punctuation count.",
                            example="--no-exact-dedup", flag="--exact-dedup/--no-exact-dedup")
    one_per_prompt: bool = opt(False, "Keep one answer per prompt (prompts compared as --exact-dedup does), e.g. after "
                               "collect --n 4.", example="--one-per-prompt", flag="--one-per-prompt/--all-per-prompt")
    # --- near duplicates (imitate/clean/dedup.py): same turns, each turn's character n-gram Jaccard >= threshold,
    #     and prompts with the same numbers, identifiers and code; LSH finds candidates, each pair is checked exactly
    near_dedup: bool = opt(True, "Near-dedup: MinHash LSH candidates, each pair checked exactly (see --threshold).",
                           example="--no-near-dedup", flag="--near-dedup/--no-near-dedup")
    near_on: Literal["both", "prompt", "answer"] = opt(
        "both", "Turns near-dedup compares: both (every non-system turn), prompt (the turns before the answer), "
        "answer.", example="answer")
    threshold: float = opt(
        0.8, "Near-duplicates: records with the same turns whose every turn has a Jaccard similarity >= this with its "
        "counterpart, over sets of character n-grams (--ngram) of the normalized text (case, whitespace, NFKC "
        "folded); prompts must also have the same numbers, identifiers and code. A one-word edit in a 20-word answer "
        "is about 0.86.", example="0.85", gt=0, le=1)
    num_perm: int = opt(128, "MinHash permutations (signature length).", example="256", ge=1)
    bands: int | None = opt(None, "LSH bands.", example="21", ge=1,
                            default_text="99 percent of pairs at --threshold become candidates (21 x 6 at 0.8)")
    ngram: int = opt(5, "Character n-gram size of near-dup shingles.", example="4", ge=1)
    verify: bool = opt(True, "Check each LSH candidate pair's exact similarity; off: LSH alone decides "
                       "(approximate).", example="--no-verify", flag="--verify/--no-verify")
    seed: int = opt(1, "MinHash permutation seed.", example="2")
    # --- survivor of a duplicate cluster
    priority: str | None = opt(None, "Dotted record field choosing a cluster's survivor: higher wins, '-field': lower "
                               "wins; ties and records without it fall back to input order.",
                               example="usage.output_tokens", default_text="input order")

    # --- selection among the answers to one student view (same messages before the answer): imitate/clean/select.py
    select: Literal["none", "agree", "judge"] = opt(
        "none", "After dedup, among the answers that share a student view (samples and teachers): none keeps them "
        "all; agree keeps the answers whose final answer (--answer-pattern) is the group's majority; judge has "
        "--judge score each answer and keeps per --keep / --min-judge-score.", example="agree")
    answer_pattern: str | None = opt(
        None, "Regex for an answer's final answer (its last match; group 1 if it has one), for --select agree.",
        example="'#### (.+)'", default_text="the last number, else the normalized last line")
    no_majority: Literal["keep", "drop"] = opt(
        "keep", "--select agree: a group with no majority answer (a tie at the top, every answer different, or one "
        "answer alone) is kept whole or dropped.", example="drop")
    judge: str | None = opt(None, "--select judge: the judge model as provider:model, asked through the collect "
                            "engine (journal CLEAN.judge.jsonl, limits, retries, budget, batch; never paid twice).",
                            example="openai:gpt-4o-mini")
    judge_template: str | None = opt(None, "--select judge: the rubric, a Jinja2 .j2 file (variables "
                                     "prompt, answer, teacher); its reply must end with 'Score: N'.",
                                     example="my_rubric.j2", path=True,
                                     default_text="built-in: 1-10 for correctness and helpfulness, reason then score")
    keep: Literal["best", "all"] = opt("best", "--select judge: keep the best-scored answer of each group (ties: the "
                                       "first in input order), or every answer (with --min-judge-score: every one "
                                       "at or above it).", example="all")
    min_judge_score: float | None = opt(None, "--select judge: drop answers scored below this.", example="7",
                                        ge=1, le=10)
    judge_options: dict[str, Any] = opt({}, "--select judge: [collect] options for the judge's requests (base-url, "
                                        "api-key-env, rpm, concurrency, retries, max-cost, batch, max-tokens...); "
                                        "repeat the flag; in TOML a table.", example="max-cost=2", parse=key_values,
                                        metavar="KEY=VALUE", flag="--judge-option")

    def judge_config(self, prompts: Path, out: Path) -> Any:
        """The collect config of the judge's run (temperature 0, 512 tokens unless --judge-option says otherwise)."""
        from imitate.collect.config import CollectConfig
        from imitate.config import build

        own = [k for k in self.judge_options if k.replace("-", "_") in JUDGE_OWN]
        if own:
            raise UsageError(f"--judge-option {own[0]}: set by the judge run itself",
                             hint="the judge is --judge; it is asked once per answer")
        fixed = {"teacher": self.judge, "prompts": prompts, "out": out}
        return build(CollectConfig, {"temperature": 0.0, "max_tokens": 512}, self.judge_options, fixed,
                     where="--judge-option")

    def check(self) -> None:
        if self.out is None:
            raise UsageError("no output file", hint="give --out CLEAN.jsonl (or out = ... in the [clean] config section)")
        if self.answer_pattern is not None:
            try:
                re.compile(self.answer_pattern)
            except re.error as exc:
                raise UsageError(f"--answer-pattern {self.answer_pattern!r} is not a valid regex: {exc}") from None
        if self.select == "judge":
            if not self.judge:
                raise UsageError("--select judge needs --judge provider:model", hint="e.g. --judge openai:gpt-4o-mini")
            self.judge_config(Path("judge.requests.jsonl"), Path("judge.jsonl"))  # bad options stop here, cheaply
        elif self.judge or self.judge_options or self.min_judge_score is not None:
            raise UsageError(f"--judge, --judge-option and --min-judge-score need --select judge (not {self.select})")
        if self.bands is not None and self.bands > self.num_perm:
            raise UsageError(f"--bands {self.bands} is more than --num-perm {self.num_perm}: each band needs at least "
                             "one permutation", hint=f"give --bands between 1 and {self.num_perm}")  # fmt: skip
        if self.select != "none" and self.one_per_prompt:
            raise UsageError("--one-per-prompt leaves one answer per prompt, so --select has nothing to choose from",
                             hint="use one of them: --select picks which answer to keep")
        for name in ("min_chars", "max_chars", "min_words", "max_words"):
            for role, v in getattr(self, name).items():
                if role not in LENGTH_ROLES:
                    raise UsageError(f"--{name.replace('_', '-')}: unknown role {role!r}",
                                     hint=f"roles: {', '.join(LENGTH_ROLES)}")
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise UsageError(f"--{name.replace('_', '-')} {role} must be a non-negative integer, got {v!r}")
        for name, n in (("max_top_ngram_frac", 3), ("max_dup_ngram_frac", 6)):
            if len(getattr(self, name)) != n:
                raise UsageError(f"--{name.replace('_', '-')} takes {n} values, got {getattr(self, name)}",
                                 hint=f"give the flag {n} times (or a list of {n} in TOML)")
        if self.bands is not None and self.bands > self.num_perm:
            raise UsageError(f"--bands must be between 1 and --num-perm ({self.num_perm}), got {self.bands}")
