"""The replica router's policy (dsvl_app.replicas.AffinityRouter), on stand-in replicas: no Ray instance."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")
from ray.serve._private.common import DeploymentID  # noqa: E402
from ray.serve.request_router import ReplicaID, RequestRouter  # noqa: E402

from dsvl_app.replicas import MAX_IMBALANCE, AffinityRouter  # noqa: E402


def replicas(*names: str) -> list:
    """Stand-ins for Serve's RunningReplica: what the policy reads is their id."""
    deployment = DeploymentID(name="engine", app_name="dsvl-chat")
    return [SimpleNamespace(replica_id=ReplicaID(unique_id=name, deployment_id=deployment)) for name in names]


def router() -> AffinityRouter:
    router = AffinityRouter.__new__(AffinityRouter)  # its Serve wiring is not needed for the policy
    router.initialize_state()
    return router


def choose(router, candidates, hashes=()) -> list[list[str]]:
    request = SimpleNamespace(kwargs={"affinity": tuple(hashes)})
    ranks = finish(router.choose_replicas(candidates, request))
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def finish(coroutine):
    """The result of a coroutine that never waits (this thread may hold another event loop: Playwright's)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("choose_replicas waited for something")


class Result:
    """A stand-in for Serve's ReplicaResult: done callbacks, fired once when the reply ends (at once if it has)."""

    def __init__(self, done: bool = False):
        self.done, self.callbacks = done, []

    def add_done_callback(self, callback) -> None:
        if self.done:
            callback(self)
        else:
            self.callbacks.append(callback)

    def finish(self) -> None:
        self.done = True
        for callback in self.callbacks:
            callback(self)


def routed(router, replica, hashes=(), result: Result | None = None) -> Result:
    result = result or Result()
    router.on_request_routed(SimpleNamespace(kwargs={"affinity": tuple(hashes)}), replica.replica_id, result)
    return result


def test_a_conversation_returns_to_its_replica_unless_it_is_much_busier():
    r = router()
    a, b = replicas("a", "b")
    routed(r, b, ["h1", "h2"]).finish()  # turn 1 of a conversation went to b
    assert choose(r, [a, b], ["h1", "h2", "h3"])[0] == ["b"]  # turn 2 extends it: back to b
    assert choose(r, [a, b], ["h1", "other"])[0] == ["b"]  # the longest remembered prefix counts
    assert choose(r, [b], ["h1", "h2"]) == [["b"]]  # the only replica left holds it
    for _ in range(MAX_IMBALANCE):
        routed(r, b, ["busy"])
    assert choose(r, [a, b], ["h1", "h2", "h3"])[0] == ["a"]  # b much busier: the load wins
    assert choose(r, [a], ["h1", "h2"]) == [["a"]]  # b gone: the others


def test_new_conversations_go_to_the_least_busy_then_in_turn():
    r = router()
    a, b, c = replicas("a", "b", "c")
    replies = [routed(r, a, ["x"]), routed(r, a, ["y"]), routed(r, b, ["z"])]
    assert choose(r, [a, b, c], ["new"])[0] == ["c"]  # nothing in flight there
    for reply in replies:
        reply.finish()
    firsts = {choose(r, [a, b, c], [f"new{n}"])[0][0] for n in range(3)}
    assert firsts == {"a", "b", "c"}  # equally idle: in turn, not always the first
    assert choose(r, [], ["new"]) == [] and choose(r, [a], []) == [["a"]]


def test_a_dead_replicas_conversations_start_afresh(monkeypatch):
    monkeypatch.setattr(RequestRouter, "on_replica_actor_died", lambda self, replica_id: None)  # Serve's part
    r = router()
    a, b = replicas("a", "b")
    routed(r, a, ["h1"])
    routed(r, b, ["h2"])
    r.on_replica_actor_died(a.replica_id)
    assert choose(r, [b], ["h1"]) == [["b"]] and "h1" not in r._owner and "h2" in r._owner


def test_a_reply_counts_until_its_result_is_done_whatever_order_serve_reports_in():
    """Serve may report a reply complete before it reports it routed (a short reply or a status call), and
    reports refused attempts complete that were never routed: neither may leave a replica counted busy."""
    r = router()
    a, b = replicas("a", "b")
    r.on_request_completed(b.replica_id, "early")  # Serve's hook fires first for a reply that is already done …
    routed(r, b, ["s"], Result(done=True))  # … then it is reported routed
    assert r._in_flight[a.replica_id] == r._in_flight[b.replica_id] == 0
    assert {choose(r, [a, b], [f"new{n}"])[0][0] for n in range(2)} == {"a", "b"}  # both idle: in turn
    busy = routed(r, a, ["long"])
    r.on_request_completed(a.replica_id, "refused")  # an attempt a full replica refused: never routed
    assert [choose(r, [a, b], [f"more{n}"])[0][0] for n in range(2)] == ["b", "b"]  # a is busy until it ends
    busy.finish()
    assert r._in_flight[a.replica_id] == 0
    assert {choose(r, [a, b], [f"after{n}"])[0][0] for n in range(2)} == {"a", "b"}  # both idle again
