"""The Ray driver's rounds (``whalesub.embedding.distributed.run_rounds``), without Ray.

A round puts the missing chunks into the shared queue and runs one call per worker until the queue
is empty. These tests play the workers by hand: a worker process that dies while holding chunks
(its chunks go into the next round, nothing else is redone), a node that writes its chunks where
the driver cannot see them (one error naming the node), and workers that keep dying on the same
chunks (an error after ``max_stalls`` rounds, not an endless loop).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from whalesub.core.errors import DataError, WhalesubError
from whalesub.embedding.distributed import run_rounds

FOLDER = Path("/shared/out.npz.parts")


class Workers:
    """Two workers draining a round's queue in turn; ``die_holding``: per round, the chunks a worker
    process had taken when it died (its call, retried by Ray, reports only what it wrote after)."""

    def __init__(self, die_holding=(), elsewhere=()):
        self.disk: set[int] = set()  # the parts folder as the driver sees it
        self.rounds: list[list[int]] = []
        self.die_holding = list(die_holding)
        self.elsewhere = set(elsewhere)  # chunks node "b" writes into a folder the driver cannot see

    def __call__(self, left: list[int]) -> list[dict]:
        self.rounds.append(list(left))
        lost = set(self.die_holding.pop(0)) if self.die_holding else set()
        written = {"a": [], "b": []}
        for i, c in enumerate(left):
            if c in lost:
                continue  # taken by a process that died: neither on disk nor reported
            node = "b" if c in self.elsewhere else "ab"[i % 2]
            written[node].append(c)
            if c not in self.elsewhere:
                self.disk.add(c)
        return [{"node": n, "chunks": len(w), "written": w} for n, w in written.items()]


def test_chunks_of_a_dead_worker_go_round_again_and_nothing_else(caplog):
    w = Workers(die_holding=[[3, 4]])
    with caplog.at_level(logging.WARNING, logger="whalesub.embedding.distributed"):
        results = run_rounds(list(range(8)), w, w.disk.__contains__, FOLDER, settle_s=0)
    assert w.rounds == [list(range(8)), [3, 4]]  # only the lost chunks were put in again
    assert w.disk == set(range(8))
    assert sorted(c for r in results for c in r["written"]) == list(range(8))  # each chunk written once
    assert "2 chunk(s) held by a worker process that died" in caplog.text


def test_everything_on_disk_needs_one_round_and_no_warning(caplog):
    w = Workers()
    with caplog.at_level(logging.WARNING, logger="whalesub.embedding.distributed"):
        run_rounds([5, 6, 7], w, w.disk.__contains__, FOLDER, settle_s=0)
    assert w.rounds == [[5, 6, 7]] and caplog.text == ""


def test_a_round_lost_entirely_is_retried_not_called_unshared():
    """One chunk left (a resumed run, or predict's small test set) and its worker dies: before,
    'no progress' read as 'the folder is not shared'; it is a retry."""
    w = Workers(die_holding=[[9]])
    run_rounds([9], w, w.disk.__contains__, FOLDER, settle_s=0)
    assert w.rounds == [[9], [9]] and w.disk == {9}


def test_a_node_writing_where_the_driver_cannot_see_is_named():
    w = Workers(elsewhere={1, 5})
    with pytest.raises(DataError) as err:
        run_rounds(list(range(6)), w, w.disk.__contains__, FOLDER, settle_s=0)
    msg = str(err.value)
    assert "node b" in msg and "[1, 5]" in msg and str(FOLDER) in msg and "not shared" in msg
    assert len(w.rounds) == 1  # no second round redoing that node's work


def test_a_file_that_appears_late_on_a_network_filesystem_is_waited_for():
    w = Workers(elsewhere={2})
    seen = {"polls": 0}

    def on_disk(c):  # chunk 2 shows up on the driver's side at the third look
        if c == 2:
            seen["polls"] += 1
            return seen["polls"] >= 3
        return c in w.disk

    run_rounds(list(range(4)), w, on_disk, FOLDER, settle_s=5)
    assert w.rounds == [list(range(4))] and seen["polls"] >= 3


def test_workers_that_keep_dying_end_in_an_error_naming_the_chunks():
    w = Workers(die_holding=[[0, 1, 2, 3]] * 10)
    w_rounds = 3
    with pytest.raises(WhalesubError) as err:
        run_rounds([2, 3, 0, 1], w, w.disk.__contains__, FOLDER, max_stalls=w_rounds, settle_s=0)
    assert len(w.rounds) == w_rounds + 1  # the first round, then max_stalls retries
    assert "[2, 3, 0, 1]" in str(err.value) and "died" in str(err.value)


def test_progress_resets_the_stall_count():
    """Rounds that each finish something never stop the run, however many."""
    w = Workers(die_holding=[[1, 2, 3, 4, 5], [2, 3, 4, 5], [3, 4, 5], [4, 5], [5]])
    run_rounds([1, 2, 3, 4, 5], w, w.disk.__contains__, FOLDER, max_stalls=1, settle_s=0)
    assert len(w.rounds) == 6 and w.disk == {1, 2, 3, 4, 5}
