"""keras_lsuv.processes in one process: nothing to exchange, and the exchange logic against a simulated second process.

The real multi-process runs are in tests/multiprocess (`make multiprocess`).
"""

import json

import keras
import numpy as np
import pytest
import zoo

from keras_lsuv import processes, statistics
from keras_lsuv.data import prepare_batch


class SimulatedPeer:
    """A 2-process group in which rank 1 answers each gather with the next of `answers` (arrays, as it would send)."""

    def __init__(self, *answers, index=0):
        self.answers = list(answers)
        self.sent = []
        self.index = index

    def gather_words(self, words):
        self.sent.append(words)
        answer = np.ascontiguousarray(self.answers.pop(0))
        other = np.frombuffer(answer.tobytes() + b"\0" * (-answer.nbytes % 4), dtype=np.int32)
        rows = [words, other] if self.index == 0 else [other, words]
        return np.stack(rows)


def in_group(peer, monkeypatch, run, make_global=None):
    """Runs `run()` with `peer` as the process group, as `lsuv_init` runs under several processes."""
    group = processes.ProcessGroup(2, peer.index, peer.gather_words, make_global)
    monkeypatch.setattr(processes, "find_group", lambda model: group)
    return processes.run_across_processes(lambda model: run())(None)


def test_one_process_exchanges_nothing():
    assert processes.find_group(zoo.deep_mlp(depth=2)) is None
    assert processes.gather(np.arange(3.0)) is None
    assert processes.shared_seed(None) is None
    assert processes.agree_on(lambda: "batch") == "batch"
    with pytest.raises(ValueError, match="^The LSUV batch is empty"):  # the message as it always was
        processes.agree_on(lambda: prepare_batch(zoo.deep_mlp(depth=2), np.zeros((0, 16), "float32")))


def test_moments_merge_every_process_weighted_by_its_size(monkeypatch):
    rng = np.random.default_rng(0)
    mine, theirs = rng.normal(size=(40, 8)), rng.normal(loc=2.0, scale=3.0, size=(88, 8))
    theirs_local = statistics.moments(keras.ops.convert_to_tensor(theirs, "float32"), (8,))
    sent = np.concatenate([[theirs_local.count], theirs_local.mean, theirs_local.m2])
    peer = SimulatedPeer(sent)
    merged = in_group(peer, monkeypatch, lambda: statistics.moments(keras.ops.convert_to_tensor(mine, "float32"), (8,)))
    both = np.concatenate([mine, theirs])
    assert merged.count == 128
    np.testing.assert_allclose(merged.mean, both.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged.m2, ((both - both.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(merged.variance(), both.var(), rtol=1e-5)
    assert len(peer.sent) == 1  # one exchange per measurement


def test_moments_are_the_same_bits_in_every_process(monkeypatch):
    rng = np.random.default_rng(1)
    a, b = (keras.ops.convert_to_tensor(rng.normal(size=(32, 4)), "float32") for _ in range(2))
    words = {}  # what each process sends: its local moments, measured as under several processes
    for name, z in (("a", a), ("b", b)):
        peer = SimulatedPeer(np.zeros(9), index=0)
        in_group(peer, monkeypatch, lambda z=z: statistics.moments(z, (4,)))
        words[name] = np.frombuffer(peer.sent[0].tobytes(), np.float64)
    seen_by_0 = in_group(SimulatedPeer(words["b"], index=0), monkeypatch, lambda: statistics.moments(a, (4,)))
    seen_by_1 = in_group(SimulatedPeer(words["a"], index=1), monkeypatch, lambda: statistics.moments(b, (4,)))
    assert seen_by_0.count == seen_by_1.count
    np.testing.assert_array_equal(seen_by_0.mean, seen_by_1.mean)
    np.testing.assert_array_equal(seen_by_0.m2, seen_by_1.m2)


def test_shared_seed_is_process_0s_draw(monkeypatch):
    assert in_group(SimulatedPeer(), monkeypatch, lambda: processes.shared_seed(5)) == 5  # given: no exchange
    as_rank_1 = in_group(
        SimulatedPeer(np.array([123456], np.int64), index=1), monkeypatch, lambda: processes.shared_seed(None)
    )
    assert as_rank_1 == 123456
    peer = SimulatedPeer(np.array([123456], np.int64), index=0)
    as_rank_0 = in_group(peer, monkeypatch, lambda: processes.shared_seed(None))
    assert as_rank_0 == int(np.frombuffer(peer.sent[0].tobytes(), np.int64)[0]) != 123456


def outcome(**fields):
    """What a process sends after preparing its batch."""
    return np.frombuffer(json.dumps(fields).encode().ljust(processes.MESSAGE_BYTES, b"\0"), np.uint8)


def test_a_bad_batch_elsewhere_fails_here_too(monkeypatch):
    peer = SimulatedPeer(outcome(error="The LSUV batch contains NaN or Inf values; LSUV needs finite training data."))
    with pytest.raises(ValueError, match=r"^LSUV batch of process 1 \(of 2\): The LSUV batch contains NaN"):
        in_group(peer, monkeypatch, lambda: processes.agree_on(lambda: np.zeros((4, 16), "float32")))


def test_a_bad_batch_here_is_reported_under_its_rank(monkeypatch):
    def prepare():
        raise ValueError("The LSUV batch is empty (0 samples).")

    peer = SimulatedPeer(outcome(samples="float32(16,)"), index=1)
    with pytest.raises(ValueError, match=r"^LSUV batch of process 1 \(of 2\): The LSUV batch is empty") as raised:
        in_group(peer, monkeypatch, lambda: processes.agree_on(prepare))
    assert isinstance(raised.value.__cause__, ValueError)  # the local error stays attached


def test_batches_of_different_sample_shapes_fail_everywhere(monkeypatch):
    peer = SimulatedPeer(outcome(samples="float32(15,)"))
    with pytest.raises(ValueError, match=r"do not fit together.*process 0: float32\(16,\); process 1: float32\(15,\)"):
        in_group(peer, monkeypatch, lambda: processes.agree_on(lambda: np.zeros((4, 16), "float32")))


def test_agreeing_batches_pass_through(monkeypatch):
    batch = np.zeros((4, 16), "float32")
    assert (
        in_group(SimulatedPeer(outcome(samples="float32(16,)")), monkeypatch, lambda: processes.agree_on(lambda: batch))
        is batch
    )


def test_a_distributed_model_measures_one_global_batch(monkeypatch):
    batch = np.zeros((4, 16), "float32")
    peer = SimulatedPeer(outcome(samples="float32(16,)", size=4), outcome())
    made = in_group(peer, monkeypatch, lambda: processes.agree_on(lambda: batch), make_global=lambda b: ("global", b))
    assert made == ("global", batch)
    z = keras.ops.ones((4, 3))
    in_group(SimulatedPeer(), monkeypatch, lambda: statistics.moments(z), make_global=lambda b: b)  # no exchange


def test_a_distributed_model_needs_shards_of_one_size(monkeypatch):
    peer = SimulatedPeer(outcome(samples="float32(16,)", size=88))
    with pytest.raises(ValueError, match="same number of LSUV samples.*process 0: 40, process 1: 88"):
        in_group(
            peer,
            monkeypatch,
            lambda: processes.agree_on(lambda: np.zeros((40, 16), "float32")),
            make_global=lambda b: b,
        )


def test_failing_to_make_the_global_batch_fails_everywhere(monkeypatch):
    def make_global(batch):
        raise RuntimeError("cannot lay out 3 samples over 2 devices")

    peer = SimulatedPeer(outcome(samples="float32(16,)", size=3), outcome())
    with pytest.raises(ValueError, match=r"process 0 \(of 2\): RuntimeError: cannot lay out"):
        in_group(peer, monkeypatch, lambda: processes.agree_on(lambda: np.zeros((3, 16), "float32")), make_global)
