"""The classroom hub and its bars without a browser: the token check, broadcast to followers only,
poll counts, the reveal, and leaving the hub when a session ends.

The bars run on DemoControllers with no document, so their hops run at once; a fake service records
submissions instead of running the engine, except in the reveal test, which grades two real runs of
the tiny model.
"""
from __future__ import annotations

import logging
import threading

import pytest

from lab.classroom import Classroom
from lab.classroom_view import PresenterBar, StudentBar, attach_classroom, poll_text
from lab.content import load_content
from lab.demo import DemoController
from lab.runs import Limits, ModelShelf, RunKey, execute
from lab.state import LabState
from tests.fakes import FakeService

TOKEN = "s3cret-Tok\u00e9n-42"


@pytest.fixture(scope="module")
def shelf():
    return ModelShelf("cpu")


def make_demo(shelf, service=None) -> DemoController:
    return DemoController(LabState(), service or FakeService(), shelf,
                          Limits(device="cpu", max_run_s=1e9))


class Recorder:
    def __init__(self) -> None:
        self.kinds: list[str] = []

    def __call__(self, kind: str) -> None:
        self.kinds.append(kind)


def test_token_right_wrong_and_unset():
    hub = Classroom(TOKEN)
    assert hub.enabled and hub.presenter(TOKEN) is not None
    for wrong in (None, "", "s3cret", TOKEN + " ", TOKEN.upper(), "\ud800", 42, b"x"):
        assert hub.presenter(wrong) is None
    off = Classroom(None)
    assert not off.enabled and off.presenter(TOKEN) is None and off.presenter("") is None
    assert not Classroom("").enabled


def test_broadcast_reaches_followers_only():
    hub = Classroom(TOKEN)
    presenter = hub.presenter(TOKEN)
    a, b, teacher = Recorder(), Recorder(), Recorder()
    hub.join("a", a)
    hub.join("b", b, following=False)
    presenter.join("t", teacher)
    version = presenter.broadcast({"batch": 16})
    assert version == 1 and "broadcast" in a.kinds
    assert "broadcast" not in b.kinds and "broadcast" not in teacher.kinds
    hub.follow("b", True)
    assert hub.view().followers == 2 and hub.view().values == {"batch": 16}


def test_poll_counts_one_commitment_per_session_until_the_reveal():
    hub = Classroom(TOKEN)
    presenter = hub.presenter(TOKEN)
    teacher = Recorder()
    presenter.join("t", teacher)
    assert not hub.commit("a", "up")  # no poll open yet
    presenter.open_poll("batch", "What happens?", (("up", "Up"), ("down", "Down")))
    for session in "abc":
        hub.join(session, Recorder())
    assert hub.commit("a", "up") and hub.commit("b", "up") and hub.commit("c", "down")
    assert not hub.commit("a", "down")  # committed means committed
    assert not hub.commit("d", "sideways")  # not a choice
    view = hub.view()
    assert dict(view.votes) == {"up": 2, "down": 1} and view.committed() == 3
    assert "votes" in teacher.kinds
    assert "Up: 2; Down: 1" in poll_text(view)
    presenter.reveal("It went up.")
    assert hub.view().revealed and hub.view().result == "It went up."
    assert not hub.commit("e", "up")  # closed by the reveal
    presenter.open_poll("page", "Next?", (("x", "X"),))
    assert hub.view().committed() == 0 and not hub.view().revealed


def test_hub_is_safe_under_concurrent_sessions():
    hub = Classroom(TOKEN)
    presenter = hub.presenter(TOKEN)
    presenter.open_poll("batch", "?", (("up", "Up"),))

    def student(i: int) -> None:
        hub.join(f"s{i}", Recorder())
        hub.commit(f"s{i}", "up")
        hub.leave(f"s{i}")

    threads = [threading.Thread(target=student, args=(i,)) for i in range(40)]
    broadcaster = threading.Thread(target=lambda: [presenter.broadcast({"batch": n})
                                                   for n in range(1, 41)])
    for t in (*threads, broadcaster):
        t.start()
    for t in (*threads, broadcaster):
        t.join()
    view = hub.view()
    assert view.votes["up"] == 40 and view.members == 0 and view.version == 40


def test_a_broken_listener_does_not_stop_the_others(caplog):
    hub = Classroom(TOKEN)
    good = Recorder()
    hub.join("bad", lambda kind: 1 / 0)
    hub.join("good", good)
    hub.presenter(TOKEN).broadcast({"batch": 2})
    assert "broadcast" in good.kinds


def test_student_bar_follows_broadcasts_and_commits(shelf):
    hub = Classroom(TOKEN)
    content = load_content()
    demo = make_demo(shelf)
    bar = StudentBar(demo, hub, content)
    assert not bar.layout.visible and bar.follow.value  # no class session yet; following by default
    presenter = hub.presenter(TOKEN)
    presenter.broadcast({**demo.state.values(), "batch": 3, "output": 9})
    assert bar.layout.visible and (demo.state.batch, demo.state.output) == (3, 9)
    assert demo.service.keys[-1].batch == 3  # the move reached the service like a slider move
    bar.follow.value = False
    presenter.broadcast({"batch": 5})
    assert demo.state.batch == 3  # not following: left alone
    bar.follow.value = True  # catching up applies the latest broadcast
    assert demo.state.batch == 5
    q = content.prediction("batch")
    presenter.open_poll("batch", q["question"], tuple((c["id"], c["label"]) for c in q["choices"]))
    assert bar.poll_box.visible and q["question"] in bar.question.object
    bar.choices.value = q["choices"][0]["id"]
    bar.commit.clicks += 1
    assert hub.view().votes[q["choices"][0]["id"]] == 1 and bar.commit.disabled
    presenter.reveal("Measured: it rose.")
    assert bar.result.visible and bar.result.object == "Measured: it rose."
    presenter.end()
    assert not bar.layout.visible


def test_closing_a_session_leaves_the_hub(shelf):
    hub = Classroom(TOKEN)
    content = load_content()
    student = StudentBar(make_demo(shelf), hub, content)
    teacher = PresenterBar(make_demo(shelf), hub.presenter(TOKEN), content)
    assert hub.view().members == 1 and hub.view().instructors == 1
    calls_before = student.demo.state.batch
    student.close()
    teacher.close()
    assert hub.stats()["members"] == 0 and hub.stats()["instructors"] == 0
    hub.presenter(TOKEN).broadcast({"batch": 40})  # nobody is called any more
    assert student.demo.state.batch == calls_before


def test_presenter_poll_histogram_and_graded_reveal(shelf):
    hub = Classroom(TOKEN)
    content = load_content()
    demo = make_demo(shelf)
    bar = PresenterBar(demo, hub.presenter(TOKEN), content)
    bar.buttons["poll"].clicks += 1
    assert hub.view().poll is None and "first measured run" in bar.message.object

    def measure(batch: int) -> None:  # a real run stands in for the instructor's latest one
        demo.state.batch = batch
        demo.trace = execute(RunKey("tiny", batch, 16, 4, 4), shelf, lambda s: None,
                             threading.Event())
        demo.shown_key = demo.state.key()
        demo.state.status = "done"

    measure(1)
    bar.control.value = "batch"
    bar.buttons["poll"].clicks += 1
    poll = hub.view().poll
    assert poll is not None and poll.control == "batch"
    hub.join("s1", Recorder())
    hub.join("s2", Recorder())
    hub.commit("s1", poll.choices[0][0])
    assert bar.source.data["count"] == [1, 0, 0, 0]
    assert list(bar.fig.y_range.factors) == [label for _, label in poll.choices]
    assert "1 of 2 student(s) committed" in bar.counts.object
    bar.buttons["reveal"].clicks += 1  # the setting has not moved yet
    assert not hub.view().revealed and "Move" in bar.message.object
    measure(4)
    bar.buttons["reveal"].clicks += 1
    view = hub.view()
    assert view.revealed and "median TPOT" in view.result and "from 1 to 4" in view.result
    assert view.version >= 1 and view.values["batch"] == 4  # the reveal also broadcasts


def test_attach_picks_the_bar_from_the_query_and_never_logs_the_token(shelf, caplog):
    content = load_content()
    caplog.set_level(logging.DEBUG)
    assert attach_classroom(make_demo(shelf), content, {"instructor": TOKEN},
                            hub=Classroom(None)) is None
    hub = Classroom(TOKEN)
    assert isinstance(attach_classroom(make_demo(shelf), content, {"instructor": TOKEN}, hub=hub),
                      PresenterBar)
    wrong = attach_classroom(make_demo(shelf), content, {"instructor": "guess"}, hub=hub)
    assert isinstance(wrong, StudentBar)
    assert isinstance(attach_classroom(make_demo(shelf), content, {}, hub=hub), StudentBar)
    assert TOKEN not in caplog.text and "guess" not in caplog.text
