"""runtime.compose: prompt splitting/weights and the pooled-embedding composition rules.

Every expected vector below is worked out by hand from the rules in the module docstring.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.compose import MODES, compose, parse_prompt

# -- parse_prompt --


def test_parse_splits_strips_and_drops_empty_pieces() -> None:
    assert parse_prompt(" , red ,, (blue sky:1.3),  (cat:0.5) ,") == [
        ("red", 1.0),
        ("blue sky", 1.3),
        ("cat", 0.5),
    ]
    assert parse_prompt("a cat, a dog") == [("a cat", 1.0), ("a dog", 1.0)]
    assert parse_prompt("") == []
    assert parse_prompt(" , ,") == []


@pytest.mark.parametrize(
    ("piece", "expected"),
    [
        ("(cat:-1)", ("cat", -1.0)),
        ("(cat:1e-1)", ("cat", 0.1)),
        ("( cat : 2 )", ("cat", 2.0)),
        ("(a:b:2)", ("a:b", 2.0)),  # the weight is after the last ':'
        ("(a photo)", ("(a photo)", 1.0)),  # no weight: literal text for CLIP
        ("time: 5pm", ("time: 5pm", 1.0)),
        ("smile :)", ("smile :)", 1.0)),
    ],
)
def test_parse_weights(piece: str, expected: tuple[str, float]) -> None:
    assert parse_prompt(piece) == [expected]


@pytest.mark.parametrize(
    "prompt",
    ["(cat:abc)", "(cat:)", "(:1.2)", "(cat:inf)", "(cat:nan)", "(cat:1.3", "(red, blue:1.2)", "((cat:1.3))"],
)
def test_parse_malformed_weight_raises(prompt: str) -> None:
    with pytest.raises(ValueError, match="weight|piece"):
        parse_prompt(prompt)


# -- compose --

P1 = np.array([1.0, 0.0, 0.0])
P2 = np.array([0.0, 2.0, 0.0])


def test_sum_mode() -> None:
    got = compose(np.stack([P1, P2]), np.array([1.0, 1.0]), np.zeros(3), mode="sum", normalize=False)
    np.testing.assert_allclose(got, [1.0, 2.0, 0.0], atol=1e-12)


def test_weighted_sum() -> None:
    # 2*[1,0,0] + 0.5*[0,2,0]
    got = compose(np.stack([P1, P2]), np.array([2.0, 0.5]), np.zeros(3), mode="sum", normalize=False)
    np.testing.assert_allclose(got, [2.0, 1.0, 0.0], atol=1e-12)


def test_diff_only_mode() -> None:
    b = np.array([1.0, 1.0, 1.0])
    pieces = np.array([[2.0, 1.0, 1.0], [1.0, 3.0, 1.0]])  # differences [1,0,0] and [0,2,0]
    got = compose(pieces, np.array([1.0, 1.0]), b, mode="diff_only", normalize=False)
    np.testing.assert_allclose(got, [2.0, 3.0, 1.0], atol=1e-12)
    # weights scale the differences: b + 3*[1,0,0] - 1*[0,2,0]
    got = compose(pieces, np.array([3.0, -1.0]), b, mode="diff_only", normalize=False)
    np.testing.assert_allclose(got, [4.0, -1.0, 1.0], atol=1e-12)


def test_diff_only_single_piece_is_identity() -> None:
    b = np.array([0.3, -0.2, 0.5])
    p = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(compose(p, np.ones(1), b, mode="diff_only", normalize=False), p[0], atol=1e-12)


def test_sum_normalize() -> None:
    # m = [3,4,0], |m| = 5, mean(|[3,0,0]|, |[0,4,0]|) = 3.5 -> m * 0.7
    pieces = np.array([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    got = compose(pieces, np.ones(2), np.zeros(3), mode="sum", normalize=True)
    np.testing.assert_allclose(got, [2.1, 2.8, 0.0], atol=1e-12)


def test_sum_normalize_uses_weighted_terms() -> None:
    # x1 = 3*[1,0,0], x2 = 4*[0,1,0]: the same numbers as above, reached through the weights
    pieces = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    got = compose(pieces, np.array([3.0, 4.0]), np.zeros(3), mode="sum", normalize=True)
    np.testing.assert_allclose(got, [2.1, 2.8, 0.0], atol=1e-12)


def test_diff_only_normalize_scales_whole_vector_by_mean_difference_norm() -> None:
    # b = [0,0,1]; differences [3,0,0], [0,4,0] (norms 3, 4, mean 3.5);
    # m = b + [3,4,0] = [3,4,1], |m| = sqrt(26); upstream rescales all of m: m * 3.5/sqrt(26)
    b = np.array([0.0, 0.0, 1.0])
    pieces = np.array([[3.0, 0.0, 1.0], [0.0, 4.0, 1.0]])
    got = compose(pieces, np.ones(2), b, mode="diff_only", normalize=True)
    expected = np.array([3.0, 4.0, 1.0]) * (3.5 / np.sqrt(26.0))
    np.testing.assert_allclose(got, expected, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(got), 3.5, atol=1e-12)
    # ...which is not "normalize the differences, then add b" ([2.1, 2.8, 1.0])
    assert not np.allclose(got, [2.1, 2.8, 1.0], atol=1e-3)


def test_keeps_float32() -> None:
    pieces = np.stack([P1, P2]).astype(np.float32)
    got = compose(pieces, np.ones(2), np.zeros(3, np.float32), mode="sum", normalize=False)
    assert got.dtype == np.float32 and got.shape == (3,)


def test_invalid_mode_names_mode_and_choices() -> None:
    with pytest.raises(ValueError, match="mode") as err:
        compose(np.stack([P1]), np.ones(1), np.zeros(3), mode="average", normalize=False)
    assert all(m in str(err.value) for m in MODES)


@pytest.mark.parametrize(
    ("pieces", "weights", "empty"),
    [
        (np.zeros((0, 3)), np.zeros(0), np.zeros(3)),  # no pieces
        (np.zeros(3), np.ones(1), np.zeros(3)),  # not (N, D)
        (np.zeros((2, 3)), np.ones(3), np.zeros(3)),  # weights length
        (np.zeros((2, 3)), np.ones(2), np.zeros(4)),  # empty length
    ],
)
def test_shape_errors(pieces: np.ndarray, weights: np.ndarray, empty: np.ndarray) -> None:
    with pytest.raises(ValueError, match="shape"):
        compose(pieces, weights, empty, mode="sum", normalize=False)


def test_normalize_zero_vector_raises() -> None:
    pieces = np.stack([P1, -P1])
    with pytest.raises(ValueError, match="zero"):
        compose(pieces, np.ones(2), np.zeros(3), mode="sum", normalize=True)
