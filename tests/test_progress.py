"""The one progress bar helper (imitate.progress.Bar) behind collect's, train's and eval's bars."""

from __future__ import annotations

from imitate.progress import Bar


def test_bar_counts_and_shows_its_fields():
    with Bar("collect", 5, fields={"rate": 0.0, "failed": 0}, columns=["{rate:.1f} req/s", "{failed} failed"]) as bar:
        bar.update(advance=2, rate=2.5, failed=1)
        bar.update(advance=1)
        task = bar.progress.tasks[0]
        assert task.completed == 3 and task.total == 5 and task.fields == {"rate": 2.5, "failed": 1}
        text = bar.progress.columns[3].render(task).plain
        assert text == "2.5 req/s"
    assert bar.progress is None  # closed; closing again is harmless
    bar.close()


def test_resumed_bar_starts_part_way_and_disabled_bars_do_nothing():
    bar = Bar("train", 10, completed=4, fields={"loss": "-"}, columns=["loss {loss}"])
    bar.update(completed=6, loss="0.5000")
    assert bar.progress.tasks[0].completed == 6 and bar.progress.tasks[0].fields["loss"] == "0.5000"
    bar.close()
    for off in (Bar("x", 10, enabled=False), Bar("x", 0)):  # --no-progress, other ranks; nothing to do
        off.update(advance=3, completed=1)
        assert off.progress is None
        off.close()
