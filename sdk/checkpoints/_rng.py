"""The process's random number generators, captured and restored for exact resume.

:func:`capture` takes the state of every global RNG a training step may draw from: python's :mod:`random`,
numpy's legacy global RNG (``np.random.*``), torch's CPU generator and, where CUDA has been initialised, the
generator of every CUDA device. :func:`restore` puts them back. The captured value is a dict of plain types
(lists, ints, floats, str, None, uint8 tensors), so ``torch.load(weights_only=True)`` reads it back with no
extra allow-listing: python's state tuple and numpy's state (including its ``uint32`` key array) become
lists of ints.

CUDA is captured only when ``torch.cuda.is_initialized()``: a process that never touched CUDA has never drawn
from it (its generators still hold what ``torch.manual_seed`` queued, which the resumed process queues the
same way), and capturing would initialise a CUDA context on every device just to read it.

Generators a program creates itself (a ``torch.Generator`` passed to a DataLoader, ``np.random.default_rng``)
are not global; they belong in the state of the object that owns them (see :mod:`sdk.data.loader`).
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["FORMAT", "capture", "restore"]

FORMAT = "podtrain.rng/1"
_PY_STATE_LEN = 625  # 624 MT19937 words and the position
_NP_KEYS_LEN = 624


def capture() -> dict[str, Any]:
    """The state of python's, numpy's (legacy global), torch's CPU and CUDA's RNGs, in weights_only types."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    cuda: list[torch.Tensor] | None = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [state.clone() for state in torch.cuda.get_rng_state_all()]
    return {
        "format": FORMAT,
        "python": {"version": int(py_version), "state": [int(x) for x in py_internal], "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": str(np_name),
            "keys": [int(x) for x in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def restore(state: dict[str, Any]) -> None:
    """Put back RNG states from :func:`capture`; raise :class:`ValueError` saying what is wrong if they are bad.

    Everything is validated before anything is set, so a bad state leaves every RNG as it was. CUDA states
    are restored to the devices present; when the checkpoint has CUDA states but this process has no CUDA
    (or a different number of devices) a warning says so, since the run can then not be exact.
    """
    py_state, np_state, torch_state, cuda_states = _validated(state)
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)
    if cuda_states is None:
        return
    if not torch.cuda.is_available():
        warnings.warn(
            f"the checkpoint holds RNG states of {len(cuda_states)} CUDA device(s) but CUDA is not available; "
            "they are not restored, so the resumed run will not be exact on the GPU",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    count = torch.cuda.device_count()
    if count != len(cuda_states):
        warnings.warn(
            f"the checkpoint holds RNG states of {len(cuda_states)} CUDA device(s), this process sees {count}; "
            f"restoring the first {min(count, len(cuda_states))}",
            RuntimeWarning,
            stacklevel=2,
        )
    for device, device_state in enumerate(cuda_states[:count]):
        torch.cuda.set_rng_state(device_state, device)


def _validated(
    state: Any,
) -> tuple[tuple[Any, ...], tuple[Any, ...], torch.Tensor, list[torch.Tensor] | None]:
    """The states in the forms the RNGs' setters take; ValueError naming the first problem."""
    if not isinstance(state, dict):
        raise ValueError(f"RNG state must be a dict from sdk.checkpoints._rng.capture(), got {type(state).__name__}")
    if state.get("format") != FORMAT:
        raise ValueError(f"RNG state has format {state.get('format')!r}, expected {FORMAT!r}")
    missing = [key for key in ("python", "numpy", "torch", "cuda") if key not in state]
    if missing:
        raise ValueError(f"RNG state lacks {', '.join(missing)}")

    py = _section(state, "python", ("version", "state", "gauss_next"))
    words = _int_list(py["state"], "python.state", _PY_STATE_LEN, 2**32)
    gauss = py["gauss_next"]
    if gauss is not None and not isinstance(gauss, float):
        raise ValueError(f"RNG state python.gauss_next must be a float or None, got {type(gauss).__name__}")
    if not _is_int(py["version"]):
        raise ValueError("RNG state python.version must be an int")
    py_state = (py["version"], tuple(words), gauss)

    npy = _section(state, "numpy", ("bit_generator", "keys", "pos", "has_gauss", "cached_gaussian"))
    if npy["bit_generator"] != "MT19937":
        raise ValueError(f"RNG state numpy.bit_generator is {npy['bit_generator']!r}, expected 'MT19937'")
    keys = _int_list(npy["keys"], "numpy.keys", _NP_KEYS_LEN, 2**32)
    pos, has_gauss, cached = npy["pos"], npy["has_gauss"], npy["cached_gaussian"]
    if not _is_int(pos) or not 0 <= pos <= _NP_KEYS_LEN:
        raise ValueError(f"RNG state numpy.pos must be an int in [0, {_NP_KEYS_LEN}], got {pos!r}")
    if has_gauss not in (0, 1) or not _is_int(has_gauss):
        raise ValueError(f"RNG state numpy.has_gauss must be 0 or 1, got {has_gauss!r}")
    if not isinstance(cached, float):
        raise ValueError(f"RNG state numpy.cached_gaussian must be a float, got {type(cached).__name__}")
    np_state = ("MT19937", np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)

    torch_state = _byte_tensor(state["torch"], "torch", torch.get_rng_state().numel())

    cuda = state["cuda"]
    cuda_states: list[torch.Tensor] | None = None
    if cuda is not None:
        if not isinstance(cuda, list):
            raise ValueError(f"RNG state cuda must be a list of tensors or None, got {type(cuda).__name__}")
        cuda_states = [_byte_tensor(t, f"cuda[{i}]", None) for i, t in enumerate(cuda)]
    return py_state, np_state, torch_state, cuda_states


def _section(state: dict[str, Any], name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    section = state[name]
    if not isinstance(section, dict):
        raise ValueError(f"RNG state {name} must be a dict, got {type(section).__name__}")
    missing = [key for key in keys if key not in section]
    if missing:
        raise ValueError(f"RNG state {name} lacks {', '.join(missing)}")
    return section


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any, name: str, length: int, bound: int) -> list[int]:
    if not isinstance(value, list) or len(value) != length:
        got = f"{len(value)} items" if isinstance(value, list) else type(value).__name__
        raise ValueError(f"RNG state {name} must be a list of {length} ints, got {got}")
    if not all(_is_int(x) and 0 <= x < bound for x in value):
        raise ValueError(f"RNG state {name} must hold ints in [0, {bound})")
    return value


def _byte_tensor(value: Any, name: str, numel: int | None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        what = (
            f"{value.dtype} tensor of {value.dim()} dims" if isinstance(value, torch.Tensor) else type(value).__name__
        )
        raise ValueError(f"RNG state {name} must be a 1-D uint8 tensor, got {what}")
    if numel is not None and value.numel() != numel:
        raise ValueError(f"RNG state {name} has {value.numel()} bytes, this torch's generator needs {numel}")
    return value.cpu()
