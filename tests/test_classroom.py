"""The classroom across page processes: the hub's rules on their own, then the hub over real HTTP
with two `Classroom` clients standing for two page processes, then the bars driven one tick at a
time.

The hub runs in a Tornado application on a thread of this process (`serverkit.AppThread`), so a
test can read its state on its loop and restart it on the same port. The bars run on
DemoControllers with no document and a fake engine client that records what it is asked to run; the
reveal test grades two real runs of the tiny model, measured in this process.
"""
from __future__ import annotations

import http.client
import json
import logging
import threading
from urllib.parse import quote

import pytest

from engine.server import classroom_hub
from engine.server.classroom import ClassroomHub, ClassView, HubError
from engine.server.classroom_hub import TOKEN_HEADER, routes
from lab.classroom import Classroom
from lab.classroom_view import PresenterBar, StudentBar, attach_classroom, poll_text
from lab.content import load_content
from lab.demo import DemoController
from lab.runs import RunKey, run_spec
from lab.state import LabState
from tests import labkit
from tests.fakes import FakeClient
from tests.labkit import TEST_ENGINE
from tests.serverkit import HOST, AppThread, free_port, wait_until

TOKEN = "s3cret-Tok\u00e9n-42"
UP_DOWN = (("up", "Up"), ("down", "Down"))


# -- the hub's rules, without HTTP ----------------------------------------------------------------
def test_token_right_wrong_and_unset():
    hub = ClassroomHub(TOKEN)
    assert hub.enabled and hub.authorised(TOKEN) and hub.authorised(TOKEN.encode())
    for wrong in (None, "", b"", "s3cret", TOKEN + " ", TOKEN.upper(), "\ud800", b"x"):
        assert not hub.authorised(wrong)
    off = ClassroomHub(None)
    assert not off.enabled and not off.authorised(TOKEN) and not off.authorised("")
    assert not ClassroomHub("").enabled


def test_presence_follow_and_broadcast_each_told_once():
    hub = ClassroomHub(TOKEN)
    heard: list[int] = []
    hub.subscribe(lambda: heard.append(hub.serial))
    hub.join("a", "p1")
    hub.join("b", "p1", following=False)
    hub.join("t", "p2", following=False, instructor=True)
    hub.join("a", "p1")  # joined again after a reconnect: no news
    view = hub.view()
    assert (view.members, view.followers, view.instructors, view.active) == (2, 1, 1, True)
    assert hub.broadcast({"batch": 16}) == 1
    hub.follow("b", True)
    hub.follow("t", True)  # an instructor never follows
    hub.follow("b", True)  # no change, nothing to tell
    view = hub.view()
    assert view.followers == 2 and view.values == {"batch": 16} and view.version == 1
    assert heard == [1, 2, 3, 4, 5] and view.serial == 5


def test_poll_counts_one_commitment_per_session_until_the_reveal():
    hub = ClassroomHub(TOKEN)
    with pytest.raises(HubError) as no_poll:
        hub.commit("a", "up")
    assert no_poll.value.status == 409
    hub.open_poll("batch", "What happens?", UP_DOWN)
    assert [hub.commit(s, c) for s, c in (("a", "up"), ("b", "up"), ("c", "down"))] == [
        "up", "up", "down"]
    for session, choice, status in (("a", "down", 409), ("d", "sideways", 400)):
        with pytest.raises(HubError) as refused:  # committed means committed; not a choice
            hub.commit(session, choice)
        assert refused.value.status == status
    view = hub.view()
    assert dict(view.votes) == {"up": 2, "down": 1} and view.committed() == 3
    assert "Up: 2; Down: 1" in poll_text(view)
    hub.reveal("It went up.")
    assert hub.view().revealed and hub.view().result == "It went up."
    with pytest.raises(HubError):
        hub.commit("e", "up")  # closed by the reveal
    assert hub.open_poll("page", "Next?", (("x", "X"),)).number == 2
    assert hub.view().committed() == 0 and not hub.view().revealed


def test_end_hides_the_class_but_keeps_its_counters():
    hub = ClassroomHub(TOKEN)
    hub.join("t", "p", following=False, instructor=True)
    hub.broadcast({"batch": 2})
    hub.open_poll("batch", "?", UP_DOWN)
    hub.end()
    view = hub.view()
    assert not view.active and view.poll is None and dict(view.values) == {}
    assert view.version == 1 and view.instructors == 1  # sessions stay joined
    assert hub.open_poll("batch", "?", UP_DOWN).number == 2  # a page tells it from the last one


def test_a_page_process_sessions_leave_with_its_last_stream():
    hub = ClassroomHub(TOKEN)
    for session, client in (("a", "p1"), ("b", "p1"), ("c", "p2")):
        hub.join(session, client)
    hub.stream_opened("p1")
    hub.stream_opened("p1")  # a reconnect that overlaps the old stream
    hub.stream_closed("p1")
    assert hub.view().members == 3
    hub.stream_closed("p1")
    assert hub.view().members == 1 and hub.stats()["streams"] == 0


def test_a_view_survives_json():
    hub = ClassroomHub(TOKEN)
    hub.join("a", "p")
    hub.broadcast({"batch": 4, "mix": "mixed", "ttft_slo": 500.0})
    hub.open_poll("batch", "What happens?", UP_DOWN)
    hub.commit("a", "down")
    view = hub.view()
    assert ClassView.from_json(json.loads(json.dumps(view.to_json()))) == view


# -- over HTTP: two clients stand for two page processes -------------------------------------------
@pytest.fixture
def server():
    hub = ClassroomHub(TOKEN)
    app = AppThread(routes(hub))
    app.hub = hub
    yield app
    app.close()


@pytest.fixture
def clients(server):
    made = [Classroom(server.url), Classroom(server.url)]
    yield made
    for client in made:
        client.close()


def settle(predicate, timeout: float = 10) -> None:
    assert wait_until(predicate, timeout, every=0.02)


def hub_view(server) -> ClassView:
    return server.call(server.hub.view)  # read on the server's loop, where the hub changes


def send(port: int, method: str, path: str, body: bytes | dict | None = None,
         headers: dict | None = None) -> tuple[int, str]:
    """One raw request; returns the status and the answer's text as sent."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(method, "/lab/classroom/" + path, data, headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def assert_no_token(text: str) -> None:
    for form in (TOKEN, quote(TOKEN, safe=""), json.dumps(TOKEN)[1:-1], "s3cret"):
        assert form not in text


def test_a_broadcast_from_one_process_reaches_the_other(server, clients):
    teacher, student = clients
    presenter = teacher.presenter(TOKEN)
    assert presenter is not None and teacher.enabled
    presenter.join("t")
    student.join("s1")
    student.join("s2")
    student.join("s3", following=False)
    assert presenter.broadcast({"batch": 16, "mix": "mixed"}) == 1
    settle(lambda: student.view().version == 1)  # only the stream could have brought it
    view = student.view()
    assert dict(view.values) == {"batch": 16, "mix": "mixed"} and view.active
    assert (view.members, view.followers, view.instructors) == (3, 2, 1)
    settle(lambda: teacher.view().members == 3)
    assert teacher.stats()["connected"] == 1 and server.call(server.hub.stats)["streams"] == 2


def test_poll_commit_reveal_and_end_across_processes(server, clients):
    teacher, student = clients
    presenter = teacher.presenter(TOKEN)
    for session in ("s1", "s2", "s3"):
        student.join(session)
    assert presenter.open_poll("batch", "What happens?", UP_DOWN).number == 1
    settle(lambda: student.view().poll is not None)
    assert student.commit("s1", "up") and student.commit("s2", "down")
    assert not student.commit("s1", "down") and not student.commit("s3", "sideways")
    assert student.committed_choice("s1") == "up" and student.committed_choice("s3") is None
    settle(lambda: dict(teacher.view().votes) == {"up": 1, "down": 1})
    presenter.reveal("It went up.")
    settle(lambda: student.view().revealed)
    assert student.view().result == "It went up." and not student.commit("s3", "up")
    presenter.open_poll("page", "Next?", UP_DOWN)
    settle(lambda: student.view().poll.number == 2)
    assert student.committed_choice("s1") is None  # a new poll: nothing committed to it yet
    presenter.end()
    settle(lambda: not student.view().active)


def test_a_wrong_or_missing_token_is_refused_and_the_token_never_leaves(server, clients, caplog):
    caplog.set_level(logging.DEBUG)
    client = clients[0]
    for wrong in (None, "", "guess", TOKEN + " ", TOKEN.upper(), "\ud800", 42, b"x"):
        assert client.presenter(wrong) is None
    bodies = {"instructor": {}, "broadcast": {"values": {"batch": 2}}, "reveal": {"result": "r"},
              "poll": {"control": "batch", "question": "?", "choices": [["up", "Up"]]},
              "end": {}, "join": {"session": "t", "client": "c", "instructor": True}}
    texts = []
    for action, body in bodies.items():
        for headers in ({}, {TOKEN_HEADER: "guess"}, {TOKEN_HEADER: quote(TOKEN.upper())},
                        {TOKEN_HEADER: ""}):
            status, text = send(server.port, "POST", action, body, headers)
            assert status == 403 and "instructor's token" in json.loads(text)["error"], action
            texts.append(text)
    view = hub_view(server)
    assert (view.version, view.poll, view.instructors, view.active) == (0, None, 0, False)

    presenter = client.presenter(TOKEN)
    presenter.join("t")
    presenter.broadcast({"batch": 2})
    presenter.open_poll("batch", "?", UP_DOWN)
    presenter.reveal("r")
    right = {TOKEN_HEADER: quote(TOKEN, safe="")}
    for action, body in bodies.items():
        status, text = send(server.port, "POST", action, body, right)
        assert status == 200, text
        texts.append(text)
    texts += [send(server.port, "GET", "view")[1], json.dumps(client.view().to_json()),
              str(client.stats()), repr(presenter), caplog.text]
    for text in texts:
        assert_no_token(text)


BAD = [  # (action, body, what the error names)
    ("join", b"not json", "not JSON"),
    ("join", b"[1]", "JSON object"),
    ("join", b"\xff", "not JSON"),
    ("join", {}, "'session'"),
    ("join", {"session": "a"}, "'client'"),
    ("join", {"session": "a" * 129, "client": "p"}, "'session'"),
    ("join", {"session": "a", "client": "p", "following": "yes"}, "'following'"),
    ("follow", {"session": "a"}, "'following'"),
    ("leave", {"session": 7}, "'session'"),
    ("commit", {"session": "a", "choice": 3}, "'choice'"),
    ("commit", {"session": "a", "choice": "sideways"}, "not a choice"),
    ("broadcast", {"values": [1]}, "'values'"),
    ("broadcast", {"values": {"batch": {"nested": 1}}}, "'values'"),
    ("broadcast", b'{"values": {"rate": NaN}}', "'values'"),
    ("poll", {"control": "batch", "question": "?", "choices": []}, "'choices'"),
    ("poll", {"control": "batch", "question": "?", "choices": [["a", "A"], ["a", "B"]]},
     "'choices'"),
    ("poll", {"control": "batch", "question": "?", "choices": [["a"]]}, "'choices'"),
    ("poll", {"control": "batch", "choices": [["a", "A"]]}, "'question'"),
    ("reveal", {"result": ""}, "'result'"),
]


def test_bad_input_answers_400_with_a_reason_and_changes_nothing(server, clients):
    clients[0].presenter(TOKEN).open_poll("batch", "?", UP_DOWN)
    before = hub_view(server).serial
    right = {TOKEN_HEADER: quote(TOKEN, safe="")}
    for action, body, names in BAD:
        status, text = send(server.port, "POST", action, body, right)
        assert status == 400 and names in json.loads(text)["error"], (action, body, text)
    status, text = send(server.port, "POST", "join", b" " * (65 * 1024), right)
    assert status == 413 and "64 KiB" in json.loads(text)["error"]
    status, text = send(server.port, "GET", "join")
    assert status == 405 and json.loads(text)["error"]
    status, text = send(server.port, "GET", "events")
    assert status == 400 and "'client'" in json.loads(text)["error"]
    assert hub_view(server).serial == before


def test_without_a_token_instructor_mode_is_off():
    app = AppThread(routes(ClassroomHub(None)))
    client = Classroom(app.url)
    try:
        assert not client.enabled and client.presenter(TOKEN) is None
        status, text = send(app.port, "POST", "join", {"session": "a", "client": "p"})
        assert status == 403 and "instructor mode is off" in json.loads(text)["error"]
        assert json.loads(send(app.port, "GET", "view")[1])["enabled"] is False
    finally:
        client.close()
        app.close()


def test_the_stream_sends_each_change_and_keeps_alive(server, monkeypatch):
    monkeypatch.setattr(classroom_hub, "KEEPALIVE_S", 0.3)
    conn = http.client.HTTPConnection(HOST, server.port, timeout=10)
    conn.request("GET", "/lab/classroom/events?client=raw")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "application/x-ndjson"
    first = json.loads(response.readline())["view"]
    assert first["serial"] == 0 and first["enabled"] is True
    send(server.port, "POST", "join", {"session": "a", "client": "raw"})
    second = json.loads(response.readline())["view"]
    assert second["serial"] == 1 and second["members"] == 1
    assert json.loads(response.readline()) == {"keepalive": True}
    conn.close()  # the page process went away: its session goes with it
    settle(lambda: hub_view(server).members == 0 and server.call(server.hub.stats)["streams"] == 0)


def test_sessions_come_back_after_the_engine_server_restarts():
    first = AppThread(routes(ClassroomHub(TOKEN)))
    client = Classroom(first.url)
    second = None
    try:
        client.join("s1")
        client.join("s2", following=False)
        settle(lambda: client.connected and client.view().members == 2)
        first.close()
        settle(lambda: not client.connected)
        assert client.view().members == 2 and client.join("s3").members == 2  # the last view
        hub = ClassroomHub(TOKEN)
        second = AppThread(routes(hub), port=first.port)
        settle(lambda: client.view().hub == hub.id and client.view().members == 3, timeout=20)
        assert client.view().followers == 2 and client.connected
        client.leave("s1")
        assert second.call(hub.view).members == 2
    finally:
        client.close()
        if second is not None:
            second.close()


def test_an_engine_server_that_is_away_does_not_break_a_page():
    client = Classroom(f"http://{HOST}:{free_port()}")
    try:
        assert not client.enabled and client.presenter(TOKEN) is None
        assert client.join("a") == client.view() and not client.commit("a", "up")
        client.leave("a")
        assert client.stats()["connected"] == 0
    finally:
        client.close()


def test_many_sessions_at_once(server, clients):
    presenter = clients[0].presenter(TOKEN)
    presenter.open_poll("batch", "?", (("up", "Up"),))
    committed: list[bool] = []

    def student(i: int) -> None:
        client = clients[i % 2]
        client.join(f"s{i}")
        committed.append(client.commit(f"s{i}", "up"))
        client.leave(f"s{i}")

    threads = [threading.Thread(target=student, args=(i,)) for i in range(20)]
    threads.append(threading.Thread(target=lambda: [presenter.broadcast({"batch": n})
                                                    for n in range(1, 21)]))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    view = hub_view(server)
    assert committed == [True] * 20
    assert view.votes["up"] == 20 and view.members == 0 and view.version == 20
    settle(lambda: clients[1].view().serial == view.serial)  # the stream ends on the newest view


# -- the bars -------------------------------------------------------------------------------------
def make_demo() -> DemoController:
    return labkit.make_demo(FakeClient(TEST_ENGINE), LabState())


def tick_until(demo: DemoController, predicate) -> None:
    settle(lambda: demo.ticker.tick() or predicate())


def test_student_bar_follows_broadcasts_and_commits(clients):
    teacher, hub = clients
    content = load_content()
    demo = make_demo()
    bar = StudentBar(demo, hub, content)
    assert not bar.layout.visible and bar.follow.value  # no class session yet; following by default
    drawn: list[int] = []
    refresh = bar.refresh
    bar.refresh = lambda view: (drawn.append(view.serial), refresh(view))
    demo.ticker.tick()
    demo.ticker.tick()
    assert drawn == []  # nothing changed: an idle tick draws nothing
    presenter = teacher.presenter(TOKEN)
    presenter.broadcast({**demo.state.values(), "batch": 3, "output": 9})
    tick_until(demo, lambda: demo.state.batch == 3)
    assert bar.layout.visible and demo.state.output == 9 and len(drawn) == 1
    assert demo.client.specs[-1]["engine"]["max_num_seqs"] == 3  # sent like a slider move
    bar.follow.value = False
    presenter.broadcast({"batch": 5})
    settle(lambda: hub.view().version == 2)
    demo.ticker.tick()
    assert demo.state.batch == 3  # not following: left alone
    bar.follow.value = True  # catching up applies the latest broadcast
    assert demo.state.batch == 5
    q = content.prediction("batch")
    presenter.open_poll("batch", q["question"], tuple((c["id"], c["label"]) for c in q["choices"]))
    tick_until(demo, lambda: bar.poll_box.visible)
    assert q["question"] in bar.question.object
    bar.choices.value = q["choices"][0]["id"]
    bar.commit.clicks += 1
    assert bar.commit.disabled and bar.committed.object.startswith("You predicted")
    settle(lambda: teacher.view().votes[q["choices"][0]["id"]] == 1)
    presenter.reveal("Measured: it rose.")
    tick_until(demo, lambda: bar.result.visible)
    assert bar.result.object == "Measured: it rose."
    presenter.end()
    tick_until(demo, lambda: not bar.layout.visible)


def test_closing_a_session_leaves_the_class(server, clients):
    content = load_content()
    student = StudentBar(make_demo(), clients[1], content)
    teacher = PresenterBar(make_demo(), clients[0].presenter(TOKEN), content)
    view = hub_view(server)
    assert (view.members, view.instructors, view.active) == (1, 1, True)
    student.close()
    teacher.close()
    view = hub_view(server)
    assert (view.members, view.instructors) == (0, 0)


def test_presenter_poll_histogram_and_graded_reveal(clients):
    teacher, students = clients
    content = load_content()
    demo = make_demo()
    bar = PresenterBar(demo, teacher.presenter(TOKEN), content)
    bar.buttons["poll"].clicks += 1
    assert teacher.view().poll is None and "first measured run" in bar.message.object

    from engine.server.measured_runs import ModelShelf, RunSpec, execute  # torch: this test only
    shelf = ModelShelf("cpu")

    def measure(batch: int) -> None:  # a real run stands in for the instructor's latest one
        demo.state.batch = batch
        spec = run_spec(RunKey("tiny", batch, 16, 4, 4), TEST_ENGINE)
        demo.trace = execute(RunSpec.from_json(spec, TEST_ENGINE.kv_cap_bytes),
                             shelf, lambda step: None, threading.Event())
        demo.shown_key = demo.state.key()
        demo.run.status = "done"

    measure(1)
    bar.control.value = "batch"
    bar.buttons["poll"].clicks += 1
    poll = teacher.view().poll
    assert poll is not None and poll.control == "batch"
    students.join("s1")
    students.join("s2")
    students.commit("s1", poll.choices[0][0])
    tick_until(demo, lambda: bar.source.data["count"] == [1, 0, 0, 0])
    assert list(bar.fig.y_range.factors) == [label for _, label in poll.choices]
    assert "1 of 2 student(s) committed" in bar.counts.object
    assert "2 student(s) here, 2 following" in bar.status.object
    bar.buttons["reveal"].clicks += 1  # the setting has not moved yet
    assert not teacher.view().revealed and "Move" in bar.message.object
    measure(4)
    bar.buttons["reveal"].clicks += 1
    view = teacher.view()
    assert view.revealed and "median TPOT" in view.result and "from 1 to 4" in view.result
    assert view.version >= 1 and view.values["batch"] == 4  # the reveal also broadcasts
    settle(lambda: students.view().revealed and students.view().values["batch"] == 4)


def test_a_presenter_whose_engine_server_went_away_is_told(server, clients):
    bar = PresenterBar(make_demo(), clients[0].presenter(TOKEN), load_content())
    server.close()
    bar.buttons["broadcast"].clicks += 1
    assert "did not get that" in bar.message.object and "did not answer" in bar.message.object


def test_attach_picks_the_bar_from_the_query_and_never_logs_the_token(clients, caplog):
    content = load_content()
    caplog.set_level(logging.DEBUG)
    off = AppThread(routes(ClassroomHub(None)))
    no_class = Classroom(off.url)
    try:
        assert attach_classroom(make_demo(), content, {"instructor": TOKEN},
                                hub=no_class) is None
    finally:
        no_class.close()
        off.close()
    hub = clients[0]
    assert isinstance(attach_classroom(make_demo(), content, {"instructor": TOKEN}, hub=hub),
                      PresenterBar)
    wrong = attach_classroom(make_demo(), content, {"instructor": "guess"}, hub=hub)
    assert isinstance(wrong, StudentBar)
    assert isinstance(attach_classroom(make_demo(), content, {}, hub=hub), StudentBar)
    assert_no_token(caplog.text)
    assert "guess" not in caplog.text
