import pytest

from llmcomm import ParallelLayout


def test_tp_innermost_like_vllm():
    L = ParallelLayout(tp=2, pp=2, dp=2)
    assert L.world_size == 8
    assert L.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert L.pp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert L.dp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # EP spans DP x PCP x TP inside one pipeline stage
    assert L.ep_size == 4
    assert L.ep_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_pcp_axis_and_ep_with_pcp():
    L = ParallelLayout(tp=2, pcp=2)
    assert L.tp_groups() == [[0, 1], [2, 3]]
    assert L.pcp_groups() == [[0, 2], [1, 3]]
    assert L.ep_groups() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("sizes", [dict(tp=1), dict(tp=4), dict(tp=2, pp=3, dp=2, pcp=2)])
def test_groups_partition_the_world(sizes):
    L = ParallelLayout(**sizes)
    for kind, groups in L.all_groups().items():
        flat = sorted(r for g in groups for r in g)
        if kind == "ep":
            assert flat == list(range(L.world_size))
            assert all(len(g) == L.ep_size for g in groups)
        else:
            assert flat == list(range(L.world_size)), kind


def test_groups_of_rank():
    L = ParallelLayout(tp=2, pp=2)
    g = L.groups_of(3)
    assert g["tp"] == [2, 3] and g["pp"] == [1, 3] and g["ep"] == [2, 3]
    with pytest.raises(ValueError, match="outside"):
        L.groups_of(4)


@pytest.mark.parametrize("bad", [dict(tp=0), dict(tp=2, pp=-1), dict(tp=2, dp=0)])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match=">= 1"):
        ParallelLayout(**bad)


def test_bad_types():
    with pytest.raises(TypeError):
        ParallelLayout(tp=2.0)
    with pytest.raises(TypeError):
        ParallelLayout(tp=True)


def test_world_size_mismatch_says_what_fits():
    with pytest.raises(ValueError, match=r"needs world_size = tp\*pp\*dp\*pcp = 8.*6 ranks.*product is 6"):
        ParallelLayout(tp=2, pp=2, dp=2).check_world_size(6)
    ParallelLayout(tp=2, pp=3).check_world_size(6)
