"""MODES: every mode by name, (built task, seed, output dir) -> trained student directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import teams
from .build import Built
from .reference import reference, reference_gkd
from .runs import after_sft, cross_train, imitate_train, on_policy

MODES: dict[str, Callable[[Built, int, Path], Path]] = {
    "reference": reference,
    "sft": imitate_train(),
    "kd": imitate_train("--teacher", "TEACHER"),
    "sckd": imitate_train("--teacher", "TEACHER", "--sckd"),
    "op50": imitate_train(*on_policy(0.5)),
    "op100": imitate_train(*on_policy(1.0)),
    "op50_sckd": imitate_train(*on_policy(0.5, "--sckd")),
    # issue #27: the reference GKD loop (fit_gkd) and imitate with its loss (reverse KL, w 0.5), both from a random
    # init with half the steps off-policy first; "_pure": on-policy steps train KD only (--no-on-policy-ce)
    "gkd50": reference_gkd(0.5),
    "gkd100": reference_gkd(1.0),
    "gkd50_pure": reference_gkd(0.5, ce=False),
    "gkd100_pure": reference_gkd(1.0, ce=False),
    "op50_rkl": imitate_train(*on_policy(0.5, "--kd", "reverse-kl")),
    "op100_rkl": imitate_train(*on_policy(1.0, "--kd", "reverse-kl")),
    "op50_rkl_pure": imitate_train(*on_policy(0.5, "--kd", "reverse-kl", "--no-on-policy-ce")),
    "op100_rkl_pure": imitate_train(*on_policy(1.0, "--kd", "reverse-kl", "--no-on-policy-ce")),
    "op50_rkl_sckd": imitate_train(*on_policy(0.5, "--kd", "reverse-kl", "--sckd")),
    # the same with imitate's default divergence, forward KL (op50 and op100 above are its CE-kept rows)
    "gkd50_fkl": reference_gkd(0.5, forward=True),
    "gkd100_fkl": reference_gkd(1.0, forward=True),
    "gkd50_fkl_pure": reference_gkd(0.5, ce=False, forward=True),
    "gkd100_fkl_pure": reference_gkd(1.0, ce=False, forward=True),
    "op50_pure": imitate_train(*on_policy(0.5, "--no-on-policy-ce")),
    "op100_pure": imitate_train(*on_policy(1.0, "--no-on-policy-ce")),
    "op100_jsd": imitate_train(*on_policy(1.0, "--kd", "jsd")),
    # the same, with KD cut after the first sampled token the teacher finds implausible (--on-policy-cut, min-p 0.1)
    "op50_rkl_cut": imitate_train(*on_policy(0.5, "--kd", "reverse-kl", "--on-policy-cut", 0.1)),
    "op100_rkl_cut": imitate_train(*on_policy(1.0, "--kd", "reverse-kl", "--on-policy-cut", 0.1)),
    "op50_rkl_pure_cut": imitate_train(*on_policy(0.5, "--kd", "reverse-kl", "--no-on-policy-ce", "--on-policy-cut", 0.1)),
    "op100_rkl_pure_cut": imitate_train(*on_policy(1.0, "--kd", "reverse-kl", "--no-on-policy-ce", "--on-policy-cut",
                                                   0.1)),
    # from an SFT'd student (the README's advice for on-policy): the sft run, then as many steps again
    "sft_sft": after_sft(),
    "sft_kd": after_sft("--teacher", "TEACHER"),
    "sft_op100": after_sft(*on_policy(1.0)),
    "sft_op50": after_sft(*on_policy(0.5)),
    "sft_op100_sckd": after_sft(*on_policy(1.0, "--sckd")),
    "sft_op50_sckd": after_sft(*on_policy(0.5, "--sckd")),
    "sft_op100_pure": after_sft(*on_policy(1.0, "--no-on-policy-ce")),
    # variants run on request (--modes), not by default: λ 0.5 without CE, the sampling temperature and the divergence
    # of on-policy KD (these three without CE, as the README measured them)
    "sft_op50_pure": after_sft(*on_policy(0.5, "--no-on-policy-ce")),
    "sft_op100_t05": after_sft(*on_policy(1.0, "--no-on-policy-ce", "--on-policy-temperature", 0.5)),
    "sft_op100_t0": after_sft(*on_policy(1.0, "--no-on-policy-ce", "--on-policy-temperature", 0)),
    "sft_op100_rkl": after_sft(*on_policy(1.0, "--no-on-policy-ce", "--kd", "reverse-kl")),
}

# cross-tokenizer (issue #22): a student whose tokenizer is not the teacher's, on records collected with --logprobs 20
MODES.update({
    "x_sft": cross_train(20, "--no-graybox"),  # its SFT baseline: the log-probs ignored
    "x_kd": cross_train(20, "--no-graybox", "--teacher", "TEACHER"),  # white-box, aligned by text
    "x_gb5": cross_train(5),  # gray-box from the records' top-5
    "x_gb20": cross_train(20),  # gray-box from the records' top-20
})
X_MODES = ("x_sft", "x_kd", "x_gb5", "x_gb20")
EXTRA_MODES = ["sft_op50_pure", "sft_op100_t05", "sft_op100_t0", "sft_op100_rkl", "gkd50", "gkd100", "gkd50_pure",
               "gkd100_pure", "op50_rkl", "op100_rkl", "op50_rkl_pure", "op100_rkl_pure", "op50_rkl_sckd", "gkd50_fkl", "gkd100_fkl", "gkd50_fkl_pure",
               "gkd100_fkl_pure", "op50_pure", "op100_pure", "op100_jsd", "op50_rkl_cut", "op100_rkl_cut",
               "op50_rkl_pure_cut", "op100_rkl_pure_cut", *X_MODES]
teams.register(MODES, EXTRA_MODES)  # teams of teachers, selection, TAKD (issue 25)
