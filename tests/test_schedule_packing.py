"""The numpy flow-match schedule equals diffusers' scheduler; packing keeps original positions."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_context.runtime.errors import InputError, SelectionError
from sparse_context.runtime.packing import pack_grid, pack_references, unpack_grid
from sparse_context.runtime.schedule import compute_empirical_mu, flow_match_schedule
from sparse_context.runtime.tokens import MAX_REFERENCES, grid_position_ids, kept_token_count

CONFIGS = [
    {},
    {"use_dynamic_shifting": True, "shift": 3.0},
    {"use_dynamic_shifting": True, "time_shift_type": "linear"},
    {"shift": 3.0, "shift_terminal": 0.02},
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps,seq_len", [(4, 4096), (1, 256), (3, 4301), (28, 1024)])
def test_schedule_equals_diffusers(config, steps, seq_len):
    torch = pytest.importorskip("torch", reason="the comparison runs diffusers' scheduler")
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps == 1 and config.get("shift_terminal"):
        pytest.skip("shift_terminal with one step divides by zero in diffusers too")
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps),
                            mu=compute_empirical_mu(seq_len, steps))
    ours = flow_match_schedule(steps, seq_len, config)
    assert np.array_equal(ours.sigmas, scheduler.sigmas.numpy())
    assert np.array_equal(ours.timesteps, scheduler.timesteps.numpy())
    # the Euler update, exactly as scheduler.step computes it in float32
    sample = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0))
    velocity = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(1))
    scheduler.set_begin_index(0)
    theirs = scheduler.step(velocity, scheduler.timesteps[0], sample, return_dict=False)[0]
    mine = sample.numpy() + ours.step_delta(0) * velocity.numpy()
    assert np.array_equal(mine, theirs.numpy())


def test_schedule_rejects_bad_steps_and_options():
    with pytest.raises(InputError, match=r"steps: got 0.*--steps"):
        flow_match_schedule(0, 256)
    with pytest.raises(InputError, match="use_karras_sigmas"):
        flow_match_schedule(4, 256, {"use_karras_sigmas": True})
    with pytest.raises(InputError, match="time_shift_type"):
        flow_match_schedule(4, 256, {"use_dynamic_shifting": True, "time_shift_type": "cubic"})
    with pytest.raises(InputError, match="one per step"):
        flow_match_schedule(4, 256, sigmas=[1.0, 0.5])


def test_pack_roundtrip_and_positions():
    grid = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (C, rows, cols)
    tokens = pack_grid(grid)
    assert tokens.shape == (12, 2)
    assert np.array_equal(tokens[5], grid[:, 1, 1])  # row-major: token 5 is (row 1, col 1)
    assert np.array_equal(unpack_grid(tokens, 3, 4), grid)

    second = grid + 100
    packed = pack_references([grid, second], [np.array([11, 0, 5]), np.array([7])])
    assert packed.counts == (3, 1) and packed.num_tokens == 4 and packed.available == 24
    assert packed.position_ids.tolist() == [[10, 0, 0, 0], [10, 1, 1, 0], [10, 2, 3, 0], [20, 1, 3, 0]]
    assert np.array_equal(packed.tokens[3], second[:, 1, 3])


def test_pack_equals_gathering_each_packed_grid():
    """numpy grids are gathered straight into one array; torch grids by indexing; both equal the plain way."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    grids = [rng.standard_normal((8, 5, 7)).astype(np.float32), rng.standard_normal((8, 1, 3)),
             rng.standard_normal((8, 4, 4)).astype(np.float16)]
    kept = [rng.choice(35, 9, replace=False), np.array([2, 0, 1]), np.array([], dtype=np.int64)]
    for selections in (kept, None):
        packed = pack_references(grids, selections)
        keeps = selections or [np.arange(g.shape[1] * g.shape[2]) for g in grids]
        expected = np.concatenate([pack_grid(g)[np.sort(k)] for g, k in zip(grids, keeps)])
        expected_ids = np.concatenate([grid_position_ids(g.shape[1], g.shape[2], 10 + 10 * i)[np.sort(k)]
                                       for i, (g, k) in enumerate(zip(grids, keeps))])
        assert packed.tokens.dtype == expected.dtype == np.float64 and packed.tokens.flags.c_contiguous
        np.testing.assert_array_equal(packed.tokens, expected)
        np.testing.assert_array_equal(packed.position_ids, expected_ids)
        assert packed.position_ids.dtype == np.int64
        assert packed.counts == tuple(len(k) for k in keeps) and packed.grids == ((5, 7), (1, 3), (4, 4))
        with_torch = pack_references([torch.from_numpy(g.astype(np.float64)) for g in grids], selections)
        np.testing.assert_array_equal(with_torch.tokens.numpy(), expected)
        np.testing.assert_array_equal(with_torch.position_ids, expected_ids)


def test_pack_edge_cases():
    grid = np.zeros((4, 2, 2), np.float32)
    empty = pack_references([grid], [np.array([], dtype=np.int64)])
    assert empty.num_tokens == 0 and empty.tokens.shape == (0, 4)
    assert pack_references([]).num_tokens == 0
    with pytest.raises(SelectionError, match=r"indices in \[0, 4\)"):
        pack_references([grid], [np.array([4])])
    with pytest.raises(SelectionError, match="unique"):
        pack_references([grid], [np.array([1, 1])])
    with pytest.raises(SelectionError, match="one per reference"):
        pack_references([grid, grid], [np.array([1])])
    with pytest.raises(InputError, match=f"at most {MAX_REFERENCES}"):
        pack_references([grid] * (MAX_REFERENCES + 1))


@pytest.mark.parametrize("keep,expected", [(1.0, 4096), (0.25, 1024), (0.10, 410), (0.05, 205), (1e-9, 1)])
def test_kept_token_count(keep, expected):
    assert kept_token_count(4096, keep) == expected


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan"), "abc", None])
def test_kept_token_count_rejects(keep):
    with pytest.raises(InputError, match=r"keep fraction: got .*\(0, 1\].*--keep"):
        kept_token_count(100, keep)
