"""Feature-KD regressors: pair parsing, shapes against real tiny models, save/load."""

from __future__ import annotations

import pytest
import torch

from imitate.errors import InputError, UsageError
from imitate.train.features import FeatureRegressors, load_regressors, parse_pairs, term_name


@pytest.mark.parametrize(
    ("n_s", "n_t", "expected"),
    [
        (2, 3, [(1, 2), (2, 3)]),
        (4, 12, [(1, 3), (2, 6), (3, 9), (4, 12)]),
        (3, 3, [(1, 1), (2, 2), (3, 3)]),
        (4, 2, [(1, 1), (2, 1), (3, 2), (4, 2)]),
    ],
)
def test_auto_spreads_student_layers_evenly(n_s, n_t, expected):
    assert parse_pairs("auto", n_s, n_t) == expected


def test_explicit_pairs_and_their_errors():
    assert parse_pairs("1:2, 2:3", 2, 3) == [(1, 2), (2, 3)]
    for bad in ("1-2", "3:1", "1:4", "0:1", "1:2,1:2"):
        with pytest.raises(UsageError) as err:
            parse_pairs(bad, 2, 3)
        assert "--feature-kd" in err.value.message


def test_regressor_shapes_on_tiny_models(tiny_model_dir, tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    pairs = parse_pairs("auto", student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    regs = FeatureRegressors(pairs, student.config.hidden_size, teacher.config.hidden_size)
    ids = torch.randint(0, 300, (2, 9))
    s_out = student(ids, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=True)
    assert len(s_out.hidden_states) == 3 and len(t_out.hidden_states) == 4  # embeddings + one per block
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, :4] = False
    terms = regs.terms(s_out.hidden_states, t_out.hidden_states, mask)
    assert list(terms) == [term_name(p) for p in pairs] == ["feature_s1_t2", "feature_s2_t3"]
    for total, n in terms.values():
        assert n == 10 and total.ndim == 0 and total > 0
    assert regs.maps["feature_s1_t2"].weight.shape == (48, 32)
    total = sum(t for t, _ in terms.values())
    total.backward()
    assert all(p.grad is not None for p in regs.parameters())


def test_save_load_round_trip(tmp_path):
    regs = FeatureRegressors([(1, 2), (2, 3)], 8, 12)
    regs.save(tmp_path / "student")
    back = load_regressors(tmp_path / "student")
    assert back.pairs == [(1, 2), (2, 3)] and (back.student_width, back.teacher_width) == (8, 12)
    x = torch.randn(3, 8)
    for name in regs.maps:
        torch.testing.assert_close(back.maps[name](x), regs.maps[name](x))
    with pytest.raises(InputError, match="no saved feature regressors"):
        load_regressors(tmp_path / "elsewhere")
