import pytest
import torch

from prunekit.ops import pack24 as ops
from prunekit.ref import pack24 as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_24(rows, k, dtype, gen, specials=True):
    """A 2:4 weight mixing full groups, groups with one nonzero and all-zero groups, plus -0.0 and NaN."""
    W = torch.randn(rows, k, generator=gen).to(dtype)
    score = torch.rand(rows, k, generator=gen)
    keep = torch.zeros(rows, k // 4, 4, dtype=torch.bool)
    order = torch.sort(score.reshape(rows, k // 4, 4), dim=-1, stable=True).indices
    n_keep = torch.randint(0, 3, (rows, k // 4), generator=gen)
    for j in range(2):
        keep.scatter_(-1, order[..., j:j + 1], (n_keep > j).unsqueeze(-1))
    W = torch.where(keep.reshape(rows, k), W, torch.zeros((), dtype=dtype))
    if specials and rows > 2 and k >= 8:
        W[1, 1] = -0.0  # stored as an explicit zero when its group has room
        W[2, 0] = float("nan")
        W[2, 1:4] = 0
    return W


def bits(t):
    return ref.as_bits(t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (17, 40), (33, 264)])
def test_round_trip_and_implementations_agree(dtype, shape, gen):
    W = random_24(*shape, dtype, gen)
    v_ref, m_ref = ref.pack24(W)
    v_cpp, m_cpp = ops.pack24(W)
    v_tri, m_tri = ops.triton_pack24(W)
    assert torch.equal(bits(v_cpp), bits(v_ref)) and torch.equal(m_cpp, m_ref)
    assert torch.equal(bits(v_tri), bits(v_ref)) and torch.equal(m_tri, m_ref)
    assert v_ref.shape == (shape[0], shape[1] // 2) and m_ref.shape == (shape[0], shape[1] // 8)
    assert set((m_ref & 0xF).unique().tolist()) | set((m_ref >> 4).unique().tolist()) <= set(ref.VALID_NIBBLES)

    expected = bits(W).clone()
    expected[~ref.kept_positions(W)] = 0  # a -0.0 that was not stored comes back as +0.0
    for back in (ref.unpack24(v_ref, m_ref), ops.unpack24(v_ref, m_ref), ops.triton_unpack24(v_ref, m_ref)):
        assert back.dtype == dtype
        assert torch.equal(bits(back), expected)


def test_negative_zero_stored_in_a_group_with_room_survives():
    W = torch.tensor([[-0.0, 0.0, 0.0, 0.0, 1.0, -0.0, 0.0, 2.0]])
    v, m = ops.pack24(W)
    assert m.tolist() == [[0x4 | (0xC << 4)]]  # all-zero group keeps (0,1); the other keeps its two nonzeros
    back = ops.unpack24(v, m)
    assert torch.equal(bits(back[:, :4]), bits(W[:, :4]))  # -0.0 at position 0 was stored
    assert bits(back)[0, 5] == 0  # -0.0 at an unstored position becomes +0.0


def test_fill_rule_lowest_unused_positions():
    W = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 7.0, 0.0, 0.0]])
    v, m = ops.pack24(W)
    # group 0: nonzero at 3, fill with 0 -> (0,3)=0xC; group 1: nonzero at 1, fill 0 -> (0,1)=0x4
    assert m.tolist() == [[0xC | (0x4 << 4)]]
    assert v.tolist() == [[0.0, 5.0, 0.0, 7.0]]


@pytest.mark.parametrize("impl", ["ref", "cpp", "triton"])
def test_over_full_group_names_first_row_and_group(impl):
    W = torch.zeros(5, 16)
    W[3, 8:11] = 1.0  # row 3, group 2: three nonzeros
    W[4, 0:4] = 1.0   # a later offender must not be the one reported
    fn = {"ref": ref.pack24, "cpp": ops.pack24, "triton": ops.triton_pack24}[impl]
    with pytest.raises(ValueError, match=r"row 3, group 2 \(input features 8..11\) has 3 nonzeros"):
        fn(W)


@pytest.mark.parametrize("impl", ["ref", "cpp", "triton"])
def test_invalid_nibble_names_position(impl):
    v = torch.zeros(2, 8)
    m = torch.full((2, 2), 0x44, dtype=torch.uint8)
    m[1, 1] = 0x4 | (0xA << 4)  # row 1, group 3 is undefined
    fn = {"ref": ref.unpack24, "cpp": ops.unpack24, "triton": ops.triton_unpack24}[impl]
    with pytest.raises(ValueError, match=r"nibble 0xA at row 1, group 3"):
        fn(v, m)


def test_width_and_dtype_errors():
    with pytest.raises(ValueError, match="divisible by 8"):
        ops.pack24(torch.zeros(2, 12))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        ops.pack24(torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not describe one 2:4"):
        ops.unpack24(torch.zeros(2, 8), torch.zeros(2, 3, dtype=torch.uint8))


def test_non_contiguous_input(gen):
    W = random_24(24, 16, torch.float32, gen, specials=False)
    Wt = torch.empty(16, 24).t()  # non-contiguous [24, 16]
    Wt.copy_(W)
    v, m = ops.pack24(Wt)
    assert torch.equal(ops.unpack24(v, m), W)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype, gen):
    W = random_24(7, 24, dtype, gen, specials=False)  # NaN != NaN would fail the comparison
    torch.library.opcheck(torch.ops.prunekit.pack24, (W,))
    v, m = ops.pack24(W)
    torch.library.opcheck(torch.ops.prunekit.unpack24, (v, m))
