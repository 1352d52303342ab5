"""Snippet features of one video and stream: ``[T, C]`` float32, loaded without unpickling.

Accepted files: ``.npy`` (``allow_pickle=False``), ``.npz`` (array ``feats``, or its only
array), ``.pt`` (a tensor, ``weights_only=True``). Every load checks dtype, shape and finiteness
and names the file and video when something is wrong.
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from gcm_core.data.model import FormatError


def torch_load_problem(err: Exception) -> str:
    """Why a restricted ``torch.load`` (plain types and tensors only) failed, in a line, without
    torch's advice to load the file again unrestricted (which runs whatever code the file holds)."""
    if isinstance(err, pickle.UnpicklingError):
        return ("not plain tensors and types as torch.save writes them: another format, or objects that only "
                "unpickling would read, and gcm-tal never unpickles")
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}"


def load_features(path: str | Path, video: str | None = None) -> np.ndarray:
    """The ``[T, C]`` float32 features in ``path``; FormatError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "feature file missing", video=video)
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                key = "feats" if "feats" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise FormatError(path, f"no 'feats' array among {keys}", video=video)
                array = archive[key]
        elif path.suffix == ".pt":
            loaded = torch.load(path, weights_only=True, map_location="cpu")
            if not isinstance(loaded, torch.Tensor):
                raise FormatError(path, f"expected a tensor, found {type(loaded).__name__}", video=video)
            array = loaded.numpy()
        else:
            raise FormatError(path, "unknown feature format (expected .npy, .npz or .pt)", video=video)
    except FormatError:
        raise
    except ValueError as err:  # numpy refuses object arrays without pickle
        raise FormatError(path, f"cannot be read without unpickling ({err})", video=video) from None
    except Exception as err:  # truncated or corrupt archives
        raise FormatError(path, f"unreadable feature file: {torch_load_problem(err)}", video=video) from None
    return check_features(array, path, video)


def check_features(array: np.ndarray, path: str | Path, video: str | None = None) -> np.ndarray:
    """``array`` as C-contiguous float32 [T, C] after checking dtype, ndim, size and values."""
    if array.dtype.kind != "f":
        raise FormatError(path, f"features must be floating point, got dtype {array.dtype}", video=video)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise FormatError(path, f"features must have shape [T, C] with T, C > 0, got {array.shape}", video=video)
    if not np.isfinite(array).all():
        t = int(np.argwhere(~np.isfinite(array))[0, 0])
        raise FormatError(path, f"non-finite value (NaN or inf) at snippet {t}", video=video)
    return np.ascontiguousarray(array, dtype=np.float32)


def split_streams(array: np.ndarray, columns: Mapping[str, Sequence[int]], path: str | Path,
                  video: str | None = None) -> dict[str, np.ndarray]:
    """Each stream's ``[start, stop)`` columns of a file that holds several streams side by side
    (ActionFormer's THUMOS'14 I3D release: RGB in the first 1024 columns, flow in the next 1024)."""
    width = max(int(stop) for _, stop in columns.values())
    if array.shape[1] < width:
        raise FormatError(path, f"features are {array.shape[1]}-d, the streams' columns need {width}", video=video)
    return {s: np.ascontiguousarray(array[:, int(start):int(stop)]) for s, (start, stop) in columns.items()}


STREAM_LENGTH_SLACK = 1  # snippets by which the streams of one video may differ (see align_streams)


def align_streams(features: Mapping[str, np.ndarray], path: str | Path, video: str | None = None
                  ) -> dict[str, np.ndarray]:
    """The streams of one video on one snippet grid: cut at the end to the shortest stream's length.

    Optical flow of n frames has n - 1 fields, so a flow extractor on the same snippet grid yields
    one snippet fewer than RGB whenever the last snippet ends on the last frame; both start at
    frame 0, so the RGB stream's extra last snippet is dropped. Streams that differ by more than
    ``STREAM_LENGTH_SLACK`` snippets do not describe the same frames: an error naming ``path``.
    """
    lengths = {s: f.shape[0] for s, f in features.items()}
    shortest = min(lengths.values())
    if max(lengths.values()) - shortest > STREAM_LENGTH_SLACK:
        raise FormatError(path, f"streams disagree on the number of snippets: {lengths} (at most "
                                f"{STREAM_LENGTH_SLACK} apart, for optical flow's one field fewer)", video=video)
    return {s: f[:shortest] for s, f in features.items()}
