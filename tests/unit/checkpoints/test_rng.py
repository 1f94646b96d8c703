"""Global RNG states: capture, restore, and a saved form that loads with weights_only and no allow-list."""

from __future__ import annotations

import io
import pickle
import random
from typing import Any

import numpy as np
import pytest
import torch

from sdk.checkpoints import _rng as rng


def _draws() -> tuple[list[float], list[float], list[float], float, float]:
    """A few numbers from every global RNG, including the cached-gaussian paths of python and numpy."""
    py = [random.random() for _ in range(5)]
    npy = np.random.rand(5).tolist()
    th = torch.rand(5).tolist()
    return py, npy, th, random.gauss(0, 1), float(np.random.standard_normal())


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_restore_repeats_the_draws_of_python_numpy_and_torch() -> None:
    """After restore(capture()), python, numpy and torch draw exactly what they drew after the capture."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    state = rng.capture()
    expected = _draws()
    rng.restore(state)
    assert _draws() == expected


def test_restore_brings_back_pending_gaussians() -> None:
    """A gaussian cached inside python's and numpy's RNG at capture time is restored, not lost."""
    random.seed(4)
    np.random.seed(5)
    random.gauss(0, 1)  # python caches the second gaussian of the pair
    np.random.standard_normal()  # numpy's legacy RNG caches one too
    state = rng.capture()
    assert state["python"]["gauss_next"] is not None
    assert state["numpy"]["has_gauss"] == 1
    expected = (random.gauss(0, 1), float(np.random.standard_normal()))
    random.seed(0)
    np.random.seed(0)
    rng.restore(state)
    assert (random.gauss(0, 1), float(np.random.standard_normal())) == expected


def test_captured_state_survives_save_and_weights_only_load_without_safe_globals() -> None:
    """torch.load(weights_only=True) reads the captured state with no allow-listed globals and it restores."""
    torch.manual_seed(6)
    state = rng.capture()
    expected = _draws()
    rng.restore(_roundtrip(state))
    assert _draws() == expected


def test_raw_numpy_state_would_not_load_with_weights_only() -> None:
    """The conversion matters: numpy's own state (a uint32 array) is refused by weights_only loading."""
    with pytest.raises(pickle.UnpicklingError):
        _roundtrip(np.random.get_state())


def test_captured_state_holds_only_plain_types() -> None:
    """Numpy's uint32 keys and python's state tuple are stored as lists of python ints, no numpy objects."""
    state = rng.capture()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        else:
            assert value is None or type(value) in (int, float, str, torch.Tensor), type(value)

    walk(state)
    assert isinstance(state["numpy"]["keys"], list)
    assert len(state["numpy"]["keys"]) == 624
    assert len(state["python"]["state"]) == 625


def test_capture_is_a_snapshot_not_a_view() -> None:
    """Drawing after a capture does not change the captured torch state."""
    state = rng.capture()
    before = state["torch"].clone()
    torch.rand(100)
    assert torch.equal(state["torch"], before)


def test_cuda_is_skipped_without_cuda() -> None:
    """Without an initialised CUDA the capture holds cuda=None and restore accepts it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised here")
    state = rng.capture()
    assert state["cuda"] is None
    rng.restore(state)


def test_cuda_states_without_cuda_warn_and_restore_the_rest() -> None:
    """A checkpoint from a GPU run restored without CUDA warns that the GPU streams are not restored."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    torch.manual_seed(7)
    state = rng.capture()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    expected = torch.rand(3)
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        rng.restore(state)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_restore_repeats_cuda_draws_on_every_device() -> None:
    """With CUDA initialised, every device's generator is captured and restored."""
    torch.cuda.init()
    torch.manual_seed(8)
    state = rng.capture()
    assert state["cuda"] is not None
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = [torch.rand(4, device=f"cuda:{d}").cpu() for d in range(torch.cuda.device_count())]
    rng.restore(_roundtrip(state))
    got = [torch.rand(4, device=f"cuda:{d}").cpu() for d in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def _corrupt(path: str, value: Any) -> dict[str, Any]:
    state = rng.capture()
    *parents, leaf = path.split(".")
    target = state
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[leaf]
    else:
        target[leaf] = value
    return state


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("format", "other/1", "format"),
        ("numpy", KeyError, "lacks numpy"),
        ("python.state", [1, 2, 3], "python.state must be a list of 625 ints"),
        ("python.gauss_next", "x", "gauss_next"),
        ("numpy.keys", np.zeros(624, dtype=np.uint32), "numpy.keys must be a list"),
        ("numpy.keys", [-1] * 624, r"numpy.keys must hold ints in \[0"),
        ("numpy.pos", 625, "numpy.pos"),
        ("numpy.bit_generator", "PCG64", "MT19937"),
        ("torch", torch.zeros(10, dtype=torch.uint8), "torch has 10 bytes"),
        ("torch", torch.zeros(5056, dtype=torch.float32), "1-D uint8 tensor"),
        ("cuda", "nope", "cuda must be a list"),
    ],
)
def test_restore_rejects_a_malformed_state_and_changes_nothing(path: str, value: Any, message: str) -> None:
    """A malformed state raises ValueError naming the bad part, and leaves every RNG as it was."""
    state = _corrupt(path, value)
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    before = rng.capture()
    expected = _draws()
    rng.restore(before)
    with pytest.raises(ValueError, match=message):
        rng.restore(state)
    assert _draws() == expected


def test_restore_rejects_a_non_dict() -> None:
    """Something other than a dict is refused with a ValueError saying what was expected."""
    with pytest.raises(ValueError, match="must be a dict"):
        rng.restore([1, 2, 3])  # type: ignore[arg-type]
