"""The p2p backend's deadline record decoded into an error (``llmcomm.moe.p2p._timeout_error``):
a peer that never signalled is named; a dispatch that timed out waiting for its *own* zeroing
program (``DIRECT``, session 27: the kernels record this rank then) says so instead of naming
this rank as a missing peer."""

from llmcomm.errors import CollectiveTimeoutError
from llmcomm.moe.p2p import _timeout_error


def test_a_missing_peer_is_named_with_its_global_rank():
    e = _timeout_error(2 * 65536 + 0 + 1, [4, 5], 1, 30.0, 128, None, (32, 0))
    assert isinstance(e, CollectiveTimeoutError)
    assert e.missing_ranks == [4] and e.op == "EPDispatcher.combine (p2p)"
    assert "group rank 0 did not signal" in str(e) and "warmup()" in str(e)


def test_a_dispatch_waiting_for_its_own_zeroing_program_names_the_program():
    e = _timeout_error(1 * 65536 + 1 + 1, [4, 5], 1, 30.0, 128, None, (32, 0))
    assert e.missing_ranks == [] and e.op == "EPDispatcher.dispatch (p2p)"
    msg = str(e)
    assert "group rank 1's own dispatch waited for its program 32" in msg
    assert "128-program grid must be resident" in msg and "num_programs" in msg
    assert "did not signal" not in msg


def test_copy_engine_hint_only_for_a_dispatch_with_ce_tokens():
    assert "_ce_tokens=2048" in str(_timeout_error(65536 + 1, [0, 1], 1, 5.0, 128, 2048,
                                                   (32, 0)))
    assert "_ce_tokens" not in str(_timeout_error(2 * 65536 + 1, [0, 1], 1, 5.0, 128, 2048,
                                                  (32, 0)))
