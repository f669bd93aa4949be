"""Token selection: exact budgets, determinism, coverage, task-awareness, budgets across references, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sparse_context.runtime.errors import InputError, SelectionError
from sparse_context.runtime.images import prepare_reference, sample_images
from sparse_context.runtime.selection import (
    STRATEGY_CHOICES, Selection, Strategy, _most_important, _wrapped_mean_3x3, allocate_budget, importance_map,
    select_references, select_tokens, spread_tokens,
)
from sparse_context.runtime.tokens import kept_token_count, token_grid

SEEDS = range(5)


@pytest.fixture(scope="module")
def prepared() -> dict[str, np.ndarray]:
    """Sample photos as the VAE sees them, (H, W, 3) uint8 each."""
    return {name: np.asarray(prepare_reference(path)) for name, path in sample_images().items()}


def _grid(image: np.ndarray) -> tuple[int, int]:
    return token_grid(image.shape[1], image.shape[0])


def _max_gap(indices: np.ndarray, grid: tuple[int, int]) -> float:
    """Largest distance, in tokens, from any token of the grid to its nearest kept token."""
    rows, cols = grid
    every = np.stack(np.divmod(np.arange(rows * cols), cols), axis=1).astype(np.float64)  # (N, 2)
    kept = every[indices]  # (K, 2)
    distances = np.sqrt(((every[:, None, :] - kept[None, :, :]) ** 2).sum(axis=2))  # (N, K)
    return float(distances.min(axis=1).max())


# ---------------------------------------------------------------------------------------------- select_tokens


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize("count", [0, 1, 7, 101, 299, 300])
def test_select_tokens_exact_count(strategy, count):
    importance = np.random.default_rng(1).random((12, 25)).astype(np.float32)  # (rows, cols)
    indices = select_tokens(importance, count, strategy, seed=3)
    assert indices.dtype == np.int64
    assert len(indices) == count
    assert len(np.unique(indices)) == count
    assert np.all(np.diff(indices) > 0)
    assert count == 0 or (indices.min() >= 0 and indices.max() < 300)


@pytest.mark.parametrize("strategy", list(Strategy))
def test_select_tokens_is_deterministic_per_seed(strategy):
    importance = np.random.default_rng(2).random((32, 32)).astype(np.float32)
    first = select_tokens(importance, 100, strategy, seed=7)
    np.testing.assert_array_equal(first, select_tokens(importance, 100, strategy, seed=7))


def test_random_differs_across_seeds():
    ones = np.ones((32, 32), np.float32)
    picks = [tuple(select_tokens(ones, 100, "random", seed=seed)) for seed in SEEDS]
    assert len(set(picks)) == len(picks)


def test_flat_importance_ties_are_not_broken_in_raster_order():
    indices = select_tokens(np.zeros((32, 32), np.float32), 100, "edge", seed=0)
    assert indices.max() > 512  # raster order would put every non-floor token in the first rows


@pytest.mark.parametrize("grid", [(64, 64), (32, 48), (12, 90)])
@pytest.mark.parametrize("keep", [0.05, 0.10, 0.25])
def test_uniform_covers_the_grid_better_than_random(grid, keep):
    count = kept_token_count(grid[0] * grid[1], keep)
    ones = np.ones(grid, np.float32)
    uniform_gap = np.mean([_max_gap(select_tokens(ones, count, "uniform", seed), grid) for seed in SEEDS])
    random_gap = np.mean([_max_gap(select_tokens(ones, count, "random", seed), grid) for seed in SEEDS])
    assert uniform_gap < 0.75 * random_gap


@pytest.mark.parametrize("grid", [(1, 1), (8, 8), (9, 70), (70, 9), (64, 64)])
def test_spread_tokens_gives_exactly_count_distinct_tokens(grid):
    available = grid[0] * grid[1]
    for count in sorted({0, 1, min(2, available), available // 7, available // 2, available - 1, available}):
        tokens = spread_tokens(*grid, count, np.random.default_rng(count))
        assert len(np.unique(tokens)) == len(tokens) == count
        assert count == 0 or (tokens.min() >= 0 and tokens.max() < available)


def test_importance_strategies_keep_a_floor_of_coverage():
    importance = np.zeros((40, 40), np.float32)
    importance[:20, :20] = 1.0  # everything important sits in one quarter
    indices = select_tokens(importance, 200, "mask", seed=0, floor_fraction=0.25)
    rows, cols = np.divmod(indices, 40)
    in_corner = (rows < 20) & (cols < 20)
    assert in_corner.sum() >= 150  # the top-k part (150 tokens) lies in the important quarter ...
    assert (~in_corner).sum() >= 30  # ... and the floor (50, spread) keeps context in the other three
    only_top = select_tokens(importance, 200, "mask", seed=0, floor_fraction=0.0)
    assert np.all(np.divmod(only_top, 40)[0] < 20) and np.all(np.divmod(only_top, 40)[1] < 20)


def _select_by_lexsort(importance: np.ndarray, count: int, seed: int, floor_fraction: float) -> np.ndarray:
    """select_tokens for edge / saliency / mask written the plain way: rank the whole grid with np.lexsort."""
    rows, cols = importance.shape
    rng = np.random.default_rng(seed)
    floor_count = int(np.floor(floor_fraction * count + 0.5))
    floor = spread_tokens(rows, cols, floor_count, rng)
    keys = rng.random(rows * cols)
    ranking = np.lexsort((keys, -importance.ravel().astype(np.float64)))  # stable: equal keys by index
    ranking = ranking[~np.isin(ranking, floor)]
    return np.sort(np.concatenate([floor, ranking[: count - floor_count]])).astype(np.int64)


def _importance_maps(grid: tuple[int, int], rng: np.random.Generator) -> list[np.ndarray]:
    """Maps with few, many and no ties, of every dtype an importance can arrive in."""
    sparse = rng.random(grid).astype(np.float32)
    sparse[rng.random(grid) < 0.9] = 0.0
    signed_zeros = np.where(rng.random(grid) < 0.5, -0.0, 0.0) + (rng.random(grid) < 0.1)
    beyond_float64 = 2**53 + rng.integers(0, 3, grid, dtype=np.int64)  # 2**53 + 1 rounds to 2**53: a tie
    return [
        rng.random(grid).astype(np.float32),
        rng.integers(0, 3, grid).astype(np.float32),
        rng.integers(0, 2, grid, dtype=np.uint8),
        rng.random(grid) < 0.2,
        np.zeros(grid, np.float32),
        np.full(grid, 0.5),
        sparse,
        signed_zeros,
        beyond_float64,
        np.round(rng.random(grid), 1).astype(np.float16),
    ]


@pytest.mark.parametrize("grid", [(1, 1), (1, 9), (7, 3), (13, 17), (64, 64)])
def test_importance_selection_equals_a_full_lexsort(grid):
    rng = np.random.default_rng(sum(grid))
    available = grid[0] * grid[1]
    counts = sorted({0, 1, available // 10, available // 2, available - 1, available} & set(range(available + 1)))
    for importance in _importance_maps(grid, rng):
        for count in counts:
            for floor_fraction in (0.0, 0.25, 0.5, 1.0, float(rng.random())):
                for seed in (0, 1, int(rng.integers(2**32))):
                    expected = _select_by_lexsort(importance, count, seed, floor_fraction)
                    for strategy in ("edge", "saliency", "mask"):
                        chosen = select_tokens(importance, count, strategy, seed, floor_fraction)
                        assert chosen.dtype == np.int64
                        np.testing.assert_array_equal(chosen, expected, err_msg=f"{importance.dtype} {count=} "
                                                      f"{floor_fraction=} {seed=}")


def test_most_important_breaks_equal_keys_by_index():
    rng = np.random.default_rng(0)
    for _ in range(300):
        size = int(rng.integers(1, 60))
        importance = rng.integers(0, 3, size).astype(np.float32)
        keys = rng.integers(0, 3, size).astype(np.float64)  # ties in importance and key: index decides
        taken = rng.choice(size, int(rng.integers(0, size + 1)), replace=False)
        count = int(rng.integers(0, size - taken.size + 1))
        ranking = np.lexsort((keys, -importance.astype(np.float64)))
        expected = ranking[~np.isin(ranking, taken)][:count]
        np.testing.assert_array_equal(np.sort(_most_important(importance, keys, taken, count)), np.sort(expected))


def test_select_tokens_errors():
    ones = np.ones((8, 8), np.float32)
    with pytest.raises(SelectionError, match=r"token count: got 65; allowed: an integer from 0 to 64 .*--keep or"):
        select_tokens(ones, 65, "random", seed=0)
    with pytest.raises(SelectionError, match=r"token count: got -1; allowed: an integer from 0 to 64"):
        select_tokens(ones, -1, "uniform", seed=0)
    with pytest.raises(SelectionError, match=r"token count: got 2.5"):
        select_tokens(ones, 2.5, "uniform", seed=0)
    with pytest.raises(SelectionError, match=r"selection strategy: got 'best'; allowed: random, uniform, edge, "
                                             r"saliency, mask \(change it with --strategy\)"):
        select_tokens(ones, 4, "best", seed=0)


# ---------------------------------------------------------------------------------------------- importance


@pytest.mark.parametrize("strategy", list(Strategy))
def test_importance_map_shape_and_sign(prepared, strategy):
    image = prepared["coffee"]
    grid = _grid(image)
    mask = np.ones(image.shape[:2], np.float32) if strategy is Strategy.MASK else None
    importance = importance_map(image, grid, strategy, mask)
    assert importance.shape == grid
    assert importance.dtype == np.float32
    assert np.all(np.isfinite(importance)) and importance.min() >= 0


@pytest.mark.parametrize("strategy, factor", [("edge", 2.0), ("saliency", 1.3)])  # saliency maps are smoother
def test_task_aware_tokens_carry_more_of_their_map_than_random(prepared, strategy, factor):
    """Edge picks hold more Canny edge mass than random picks; saliency picks more saliency mass."""
    for name, image in prepared.items():
        grid = _grid(image)
        importance = importance_map(image, grid, strategy).ravel()  # (N,)
        count = kept_token_count(importance.size, 0.10)
        chosen = np.mean([importance[select_tokens(importance.reshape(grid), count, strategy, s)].sum() for s in SEEDS])
        random = np.mean([importance[select_tokens(importance.reshape(grid), count, "random", s)].sum() for s in SEEDS])
        assert chosen > factor * random, name


def test_edge_importance_follows_structure():
    image = np.full((256, 256, 3), 128, np.uint8)  # (H, W, 3) flat grey; a rectangle outline through the middle
    # Lines through the middle of tokens 4 and 11, so blur and Canny keep their edges inside those tokens.
    image[71:73, 71:185] = image[183:185, 71:185] = image[71:185, 71:73] = image[71:185, 183:185] = 20
    importance = importance_map(image, (16, 16), "edge")
    outline = np.zeros((16, 16), bool)
    outline[[4, 11], 4:12] = outline[4:12, [4, 11]] = True
    assert importance[outline].min() > 0.05
    assert importance[~outline].max() == 0.0


def test_saliency_finds_an_off_centre_object():
    rng = np.random.default_rng(0)
    image = (110 + 20 * rng.random((512, 512, 1))).repeat(3, axis=2).astype(np.uint8)  # (H, W, 3) grey texture
    yy, xx = np.mgrid[:512, :512]
    image[(yy - 380) ** 2 + (xx - 140) ** 2 < 50**2] = (200, 30, 30)  # a red disc, lower left of centre
    importance = importance_map(image, (32, 32), "saliency")
    peak_row, peak_col = np.unravel_index(np.argmax(importance), importance.shape)
    assert abs(peak_row * 16 + 8 - 380) <= 64 and abs(peak_col * 16 + 8 - 140) <= 64
    top = np.argsort(importance.ravel())[::-1][:20]  # the 20 most salient tokens
    rows, cols = np.divmod(top, 32)
    assert np.mean(np.hypot(rows * 16 + 8 - 380, cols * 16 + 8 - 140) < 100) >= 0.8


@pytest.mark.parametrize("strategy", list(Strategy))
def test_importance_of_a_flat_image_is_finite(strategy):
    image = np.full((64, 64, 3), 90, np.uint8)
    mask = np.zeros((4, 4)) if strategy is Strategy.MASK else None
    importance = importance_map(image, (4, 4), strategy, mask)
    assert np.all(np.isfinite(importance)) and importance.min() >= 0
    assert len(select_tokens(importance, 5, strategy, seed=0)) == 5


def test_wrapped_mean_equals_the_mean_of_nine_rolls():
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 3), (1, 5, 3), (4, 1, 3), (2, 2, 1), (8, 8, 3), (64, 48, 3), (9, 13)]:
        values = np.log(rng.random(shape) * 1e3 + 1e-9)
        rolled = sum(np.roll(values, (dy, dx), axis=(0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0
        np.testing.assert_array_equal(_wrapped_mean_3x3(values), rolled)  # bit for bit: same additions


def test_importance_map_wants_the_prepared_image():
    with pytest.raises(SelectionError, match=r"image to score: got '100x64 px for a 4x6 token grid'; allowed: 96x64"):
        importance_map(np.zeros((64, 100, 3), np.uint8), (4, 6), "edge")
    with pytest.raises(SelectionError, match=r"image to score: got 'ndarray \(64, 96\) uint8'; allowed: an \(H, W"):
        importance_map(np.zeros((64, 96), np.uint8), (4, 6), "edge")


def test_mask_importance_pixel_and_token_resolution():
    image = np.zeros((64, 96, 3), np.uint8)
    pixel_mask = np.zeros((64, 96), bool)
    pixel_mask[:16, :32] = True  # tokens (0, 0) and (0, 1)
    by_pixels = importance_map(image, (4, 6), "mask", pixel_mask)
    expected = np.zeros((4, 6), np.float32)
    expected[0, :2] = 1.0
    np.testing.assert_allclose(by_pixels, expected)
    np.testing.assert_allclose(importance_map(image, (4, 6), "mask", expected * 3), expected * 3)


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.ones((10, 10)), r"importance mask shape: got \(10, 10\); allowed: \(64, 96\) \(pixels of the prepared "
                            r"reference\) or \(4, 6\) \(its token grid\).*--mask"),
        (-np.ones((4, 6)), r"mask values: got 'finite range \[-1.0, -1.0\], 0 NaN or infinite'; allowed: non-negative"),
        (np.full((4, 6), np.nan), r"importance mask values: got 'no finite values, 24 NaN or infinite'"),
        (np.full((4, 6), "a"), r"importance mask dtype: got '<U1'"),
        (None, r"importance mask: got None; allowed: \(64, 96\).*--mask"),
    ],
)
def test_mask_errors(mask, message):
    with pytest.raises(SelectionError, match=message):
        importance_map(np.zeros((64, 96, 3), np.uint8), (4, 6), "mask", mask)


def test_mask_with_another_strategy_is_refused():
    with pytest.raises(SelectionError, match=r"got 'edge'; allowed: a mask only with 'mask'.*--strategy mask"):
        importance_map(np.zeros((64, 96, 3), np.uint8), (4, 6), "edge", np.ones((4, 6)))


# ---------------------------------------------------------------------------------------------- budgets


def test_per_reference_budget_uses_kept_token_count():
    maps = [np.ones((64, 64)), np.ones((20, 37)), np.ones((4, 4))]
    assert allocate_budget(maps, keep_fraction=0.1) == [kept_token_count(n, 0.1) for n in (4096, 740, 16)]
    assert allocate_budget(maps, token_count=16) == [16, 16, 16]


@pytest.mark.parametrize("keep", [0.01, 0.05, 0.1, 0.33, 1.0])
def test_global_budget_sums_exactly_with_one_per_reference(keep):
    rng = np.random.default_rng(0)
    maps = [rng.random((64, 64)), np.zeros((8, 8)), rng.random((30, 17)) * 5, np.ones((4, 4)) * 100]
    counts = allocate_budget(maps, keep_fraction=keep, allocation="global")
    assert sum(counts) == kept_token_count(sum(m.size for m in maps), keep)
    assert all(1 <= count <= m.size for count, m in zip(counts, maps))


def test_global_budget_follows_importance_mass_and_caps():
    counts = allocate_budget([np.ones((10, 10)), np.ones((10, 10)) * 3], token_count=40, allocation="global")
    assert counts == [10, 30]
    counts = allocate_budget([np.ones((2, 2)) * 100, np.ones((10, 10))], token_count=50, allocation="global")
    assert counts == [4, 46]  # the small, important map is full; the rest goes to the other
    flat = allocate_budget([np.ones((10, 10)), np.ones((30, 10))], keep_fraction=0.1, allocation="global")
    assert flat == [10, 30]  # flat maps share by token count
    assert allocate_budget([np.zeros((4, 4)), np.zeros((4, 4))], token_count=32, allocation="global") == [16, 16]


@pytest.mark.parametrize("keep", [0, 1.5, float("nan"), -0.1, "half"])
def test_bad_keep_fraction(keep):
    message = rf"keep fraction: got {keep!r}; allowed: a number in \(0, 1\] \(change it with --keep\)"
    with pytest.raises(InputError, match=message):
        allocate_budget([np.ones((4, 4))], keep_fraction=keep)
    with pytest.raises(InputError, match=message):  # checked before any image is decoded
        select_references(["missing.png"], strategy="edge", keep_fraction=keep)


def test_budget_errors():
    maps = [np.ones((4, 4)), np.ones((8, 8))]
    with pytest.raises(SelectionError, match=r"exactly one of a keep fraction or a token count.*--keep or --tokens"):
        allocate_budget(maps)
    with pytest.raises(SelectionError, match="exactly one of"):
        allocate_budget(maps, keep_fraction=0.1, token_count=3)
    with pytest.raises(SelectionError, match=r"token count \(tokens per reference\): got 17; allowed: an integer "
                                             r"from 1 to 16 \(tokens available: \[16, 64\]\).*--tokens"):
        allocate_budget(maps, token_count=17)
    with pytest.raises(SelectionError, match=r"token count \(tokens in total\): got 81; allowed: an integer from 2 to"):
        allocate_budget(maps, token_count=81, allocation="global")
    with pytest.raises(SelectionError, match=r"token count \(tokens in total\): got 1; allowed: an integer from 2"):
        allocate_budget(maps, token_count=1, allocation="global")
    with pytest.raises(SelectionError, match=r"budget allocation: got 'fair'; allowed: per_reference, global"):
        allocate_budget(maps, token_count=1, allocation="fair")


# ---------------------------------------------------------------------------------------------- select_references


def test_select_references_end_to_end():
    paths = sample_images()
    selections = select_references([paths["chelsea"], paths["coffee"]], strategy="saliency", keep_fraction=0.1, seed=3)
    assert [type(selection) for selection in selections] == [Selection, Selection]
    for path, selection in zip((paths["chelsea"], paths["coffee"]), selections):
        prepared = prepare_reference(path)
        np.testing.assert_array_equal(np.asarray(selection.image), np.asarray(prepared))
        assert selection.grid == token_grid(*prepared.size)
        assert len(selection.indices) == kept_token_count(selection.available, 0.1)
        assert abs(selection.keep_fraction - 0.1) < 0.01
        assert selection.strategy is Strategy.SALIENCY
        assert selection.importance.shape == selection.grid
        assert not selection.indices.flags.writeable


def test_select_references_seeds_per_reference():
    photo = sample_images()["rocket"]
    first, second = select_references([photo, photo], strategy="random", token_count=50)
    assert not np.array_equal(first.indices, second.indices)  # same image, different reference seed
    again = select_references([photo, photo, photo], strategy="random", token_count=50)
    np.testing.assert_array_equal(again[1].indices, second.indices)  # adding a reference changes no other
    other_seed = select_references([photo], strategy="random", token_count=50, seed=1)[0]
    assert not np.array_equal(other_seed.indices, first.indices)


def test_select_references_global_allocation():
    paths = sample_images()
    selections = select_references([paths["astronaut"], paths["chelsea"]], strategy="uniform", keep_fraction=0.1,
                                   allocation="global")
    total = sum(selection.available for selection in selections)
    assert sum(len(selection.indices) for selection in selections) == kept_token_count(total, 0.1)


def test_select_references_mask():
    image = Image.new("RGB", (128, 96), (90, 120, 150))
    mask = np.zeros((96, 128), np.float32)  # pixels of the prepared image (already a multiple of 16)
    mask[:, 64:] = 1.0
    (selection,) = select_references([image], strategy="mask", token_count=12, masks=[mask], floor_fraction=0.0)
    assert np.all(selection.indices % 8 >= 4)  # every kept token lies in the masked right half


def test_select_references_mask_drawn_on_the_original():
    image = Image.new("RGB", (1500, 1000), (90, 120, 150))  # prepared: LANCZOS to 1248x832, grid 52x78
    mask = np.zeros((1000, 1500), np.float32)  # (H, W) of the image as given
    mask[:, 750:] = 1.0
    (selection,) = select_references([image], strategy="mask", keep_fraction=0.05, masks=[mask], floor_fraction=0.0)
    assert selection.grid == (52, 78)
    np.testing.assert_allclose(selection.importance[:, 39:], 1.0)
    np.testing.assert_allclose(selection.importance[:, :39], 0.0)
    assert np.all(selection.indices % 78 >= 39)


def test_select_references_errors():
    image = Image.new("RGB", (64, 64))
    with pytest.raises(SelectionError, match=r"selection strategy: got 'smart'; allowed: " + ", ".join(STRATEGY_CHOICES)
                       + r" \(change it with --strategy\)"):
        select_references([image], strategy="smart", keep_fraction=0.1)
    with pytest.raises(InputError, match=r"number of reference images: got 11; allowed: at most 10.*--ref"):
        select_references([image] * 11, strategy="random", keep_fraction=0.1)
    with pytest.raises(SelectionError, match=r"number of reference images: got 0; allowed: at least 1.*--ref"):
        select_references([], strategy="random", keep_fraction=0.1)
    with pytest.raises(SelectionError, match=r"token count \(tokens per reference\): got 17; allowed: an integer from "
                                             r"1 to 16.*--tokens"):
        select_references([image], strategy="edge", token_count=17)
    with pytest.raises(SelectionError, match=r"importance masks for --strategy mask: got None; allowed: one mask per "
                                             r"reference \(1\).*--mask"):
        select_references([image], strategy="mask", keep_fraction=0.1)
    message = (r"importance mask shape for reference 1: got \(3, 3\); allowed: \(70, 100\) \(pixels of the "
               r"reference as given\), \(64, 96\) \(pixels of the prepared reference\) or \(4, 6\) \(its token "
               r"grid\).*--mask")
    with pytest.raises(SelectionError, match=message):
        select_references([image, Image.new("RGB", (100, 70))], strategy="mask", keep_fraction=0.1,
                          masks=[np.ones((4, 4)), np.ones((3, 3))])
    with pytest.raises(SelectionError, match=r"masks only with 'mask'.*--strategy mask"):
        select_references([image], strategy="edge", keep_fraction=0.1, masks=[np.ones((4, 4))])
    with pytest.raises(SelectionError, match=r"seed: got -1; allowed: a non-negative integer.*--seed"):
        select_references([image], strategy="edge", keep_fraction=0.1, seed=-1)


def test_runtime_imports_without_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers'):\n"
        "            raise ImportError(f'blocked import of {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import sparse_context.runtime.selection, sparse_context.runtime.images\n"
        "import sparse_context.runtime.overlay, sparse_context.runtime.tokens\n"
        "import sparse_context.runtime.benchmark_selection\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_parallel_selection_equals_serial():
    from sparse_context.runtime.images import sample_images
    from sparse_context.runtime.selection import select_references

    images = list(sample_images().values()) * 2  # 8 references
    for strategy in ("edge", "saliency", "random"):
        serial = select_references(images, strategy=strategy, keep_fraction=0.1, workers=1)
        parallel = select_references(images, strategy=strategy, keep_fraction=0.1, workers=4)
        for a, b in zip(serial, parallel, strict=True):
            np.testing.assert_array_equal(a.indices, b.indices)
            assert a.grid == b.grid


def test_selection_workers_must_be_positive():
    from sparse_context.runtime.errors import SelectionError
    from sparse_context.runtime.images import sample_images
    from sparse_context.runtime.selection import select_references

    with pytest.raises(SelectionError, match="selection workers: got 0"):
        select_references(list(sample_images().values()), strategy="edge", keep_fraction=0.1, workers=0)


# ---------------------------------------------------------------------------------------------- arrays as arrays


def _reference_kinds(size, tmp_path):
    """One sample photo at ``size`` as a PIL image, an 8-bit RGB array and a PNG file."""
    picture = Image.open(sample_images()["coffee"]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    path = tmp_path / f"coffee_{size[0]}x{size[1]}.png"
    picture.save(path)
    return {"pil": picture, "array": np.asarray(picture), "path": path}


@pytest.mark.parametrize("size", [(1024, 1024), (600, 400), (1500, 1000)])  # view, crop, LANCZOS + crop
@pytest.mark.parametrize("strategy", list(Strategy))
def test_array_references_select_what_pil_references_select(size, strategy, tmp_path):
    kinds = _reference_kinds(size, tmp_path)
    mask = np.zeros(size[::-1], np.float32)  # (H, W) of the image as given: its left third
    mask[:, : size[0] // 3] = 1.0
    masks = [mask, mask] if strategy is Strategy.MASK else None
    results = {name: select_references([source, source], strategy=strategy, keep_fraction=0.1, seed=4,
                                       masks=masks)
               for name, source in kinds.items()}
    expected = np.asarray(prepare_reference(kinds["pil"]))  # (h, w, 3)
    for name, selections in results.items():
        for selection, reference in zip(selections, results["pil"], strict=True):
            np.testing.assert_array_equal(selection.indices, reference.indices, err_msg=name)
            np.testing.assert_array_equal(selection.importance, reference.importance, err_msg=name)
            assert selection.grid == reference.grid
            np.testing.assert_array_equal(selection.pixels, expected, err_msg=name)


def test_selection_pixels_view_the_array_and_image_is_made_on_demand():
    array = np.array(Image.open(sample_images()["rocket"]).convert("RGB").resize((512, 384)))  # (384, 512, 3)
    (selection,) = select_references([array], strategy="edge", keep_fraction=0.1)
    assert np.shares_memory(selection.pixels, array)  # no copy of a prepared-size array
    assert not selection.pixels.flags.writeable and array.flags.writeable
    assert "image" not in vars(selection)  # no PIL image until someone asks for one
    image = selection.image
    assert isinstance(image, Image.Image) and image.size == (512, 384) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), array)
    assert selection.image is image  # made once


def test_cheap_selection_of_prepared_arrays_skips_the_thread_pool(monkeypatch):
    import sparse_context.runtime.selection as selection_module

    started = []
    real_pool = selection_module._thread_pool
    monkeypatch.setattr(selection_module, "_thread_pool", lambda *key: started.append(key) or real_pool(*key))
    arrays = [np.zeros((256, 256, 3), np.uint8)] * 6
    for strategy in ("uniform", "random"):
        select_references(arrays, strategy=strategy, keep_fraction=0.1, workers=2)
    assert started == []  # nothing to decode, resize or score: threads would only add their start-up cost
    select_references(arrays, strategy="edge", keep_fraction=0.1, workers=2)
    select_references([np.zeros((1100, 1000, 3), np.uint8)] * 2, strategy="uniform", keep_fraction=0.1, workers=2)
    assert len(started) == 2  # scoring pixels, and a resize, do go to the pool


def test_token_grid_mask_stays_the_callers_writable_array():
    mask = np.ones((4, 6), np.float32)  # (rows, cols) of a 96x64 reference
    reference = np.zeros((64, 96, 3), np.uint8)
    (selection,) = select_references([reference], strategy="mask", token_count=5, masks=[mask])
    assert mask.flags.writeable and not selection.importance.flags.writeable
    assert not np.shares_memory(selection.importance, mask)


def test_a_mask_given_as_a_path_is_read_as_the_cli_reads_it(tmp_path):
    image = (np.random.default_rng(1).random((96, 128, 3)) * 255).astype(np.uint8)
    mask = np.zeros((96, 128), np.uint8)
    mask[10:50, 60:120] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    from_path = select_references([image], strategy="mask", keep_fraction=0.2, masks=[tmp_path / "mask.png"])
    from_array = select_references([image], strategy="mask", keep_fraction=0.2, masks=[mask / 255.0])
    np.testing.assert_array_equal(from_path[0].indices, from_array[0].indices)
    with pytest.raises(InputError, match="mask image.*--mask"):
        select_references([image], strategy="mask", keep_fraction=0.2, masks=[str(tmp_path / "none.png")])
