"""Progress lines: counts, rate (or time per item for slow work), ETA; plain lines in logs."""
from __future__ import annotations

import io
import pickle

import pytest

from workflows import progress
from workflows.progress import Progress


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    return now


def test_fast_work_shows_items_per_second_and_the_time_left(clock):
    bar = Progress(100, "videos", "preprocess: ", stream=io.StringIO())
    clock[0] += 4.0
    bar.update(50)
    assert bar.line() == "preprocess: 50/100 videos (12.5 videos/s, elapsed 0:04, ETA 0:04)"


def test_slow_work_shows_seconds_per_item(clock):
    bar = Progress(5, "trials", "tune: ", stream=io.StringIO())
    clock[0] += 53.0
    bar.update(2)
    assert bar.line() == "tune: 2/5 trials (26.5 s/trial, elapsed 0:53, ETA 1:20)"


def test_resumed_work_does_not_count_in_the_rate(clock):
    bar = Progress(10, "trials", stream=io.StringIO())
    bar.skip(6)
    clock[0] += 10.0
    bar.update(2)
    assert bar.line() == "8/10 trials (5.0 s/trial, elapsed 0:10, ETA 0:10)"


def test_a_log_gets_a_plain_line_every_tenth_of_the_work(clock):
    log = io.StringIO()  # not a terminal
    bar = Progress(40, "videos", stream=log)
    for _ in range(40):
        clock[0] += 0.5
        bar.update()
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == [f"{n}/40" for n in range(4, 41, 4)]
    assert "\r" not in log.getvalue()


def test_a_progress_travels_where_stdout_cannot_and_writes_to_the_stdout_it_finds(clock, monkeypatch):
    """Tune pickles its callbacks (the trials' progress among them); a notebook's stdout, or
    pytest's, cannot be pickled."""
    class Unpicklable(io.StringIO):
        def __reduce__(self):
            raise TypeError("cannot pickle this stream")

    monkeypatch.setattr(progress.sys, "stdout", Unpicklable())
    bar = pickle.loads(pickle.dumps(Progress(2, "trials", "tune: ")))
    written = Unpicklable()
    monkeypatch.setattr(progress.sys, "stdout", written)
    clock[0] += 2.0
    bar.update(2)
    assert written.getvalue() == "tune: 2/2 trials (1.0 trials/s, elapsed 0:02, ETA 0:00)\n"


def test_epochs_repeated_after_a_restart_count_once_with_their_later_record():
    """A worker group restarted from the checkpoint of epoch 1 logs epoch 2 again: the report's
    training figure plots each epoch once, as the run continued from it."""
    logged = [{"epoch": 1, "loss_total": 4.3}, {"epoch": 2, "loss_total": 3.1}, {"epoch": 2, "loss_total": 3.0},
              {"epoch": 3, "loss_total": 2.7}]
    assert progress.epoch_history(logged) == [logged[0], logged[2], logged[3]]
    assert progress.epoch_history([]) == []
