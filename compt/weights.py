"""Consolidated weights on disk as safetensors: a streaming writer (one tensor at
a time, so a ZeRO-3 model is never whole in one rank's memory) and a lazy reader.

The writer implements the documented safetensors layout itself because the
``safetensors`` library only writes a complete dict: 8-byte little-endian u64
header length N, N bytes of JSON header (space-padded to a multiple of 8), then
the raw little-endian tensor bytes in header order.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
from typing import Callable, Iterator, Sequence

import torch

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _attr, _code in [("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                     ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")]:
    if hasattr(torch, _attr):
        _DTYPES[getattr(torch, _attr)] = _code

_CHUNK = 1 << 20
# The safetensors header's dtype names (the format's spec) for the float dtypes compt reads or writes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class SafetensorsStreamWriter:
    """Write a safetensors file tensor by tensor, in the order given by ``specs``.

    The header is written up front from ``specs`` (name, shape, dtype). Data goes
    to ``path + ".tmp"``; ``close()`` fsyncs and atomically replaces ``path``, so a
    reader never sees a partial file. Any failed ``write`` (wrong order, shape or
    dtype) removes the tmp file and leaves a previous ``path`` untouched; the
    writer is then unusable. Used as a context manager it closes on success and
    aborts on exception.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Sequence[tuple[str, Sequence[int], torch.dtype]],
        metadata: dict[str, str] | None = None,
    ):
        if sys.byteorder != "little":
            raise RuntimeError("SafetensorsStreamWriter writes raw tensor bytes and needs a little-endian host")
        self.path = os.fspath(path)
        self.tmp_path = self.path + ".tmp"
        self._specs = [(name, tuple(int(s) for s in shape), dtype) for name, shape, dtype in specs]
        header: dict[str, object] = {}
        if metadata is not None:
            bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
            if bad:
                raise ValueError(f"safetensors metadata must map str to str; offending entries: {bad!r}")
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, shape, dtype in self._specs:
            if name == "__metadata__" or name in header:
                raise ValueError(f"tensor name {name!r} is duplicated or reserved")
            if dtype not in _DTYPES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors code")
            end = offset + _nbytes(shape, dtype)
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
        header_bytes += b" " * (-len(header_bytes) % 8)

        self._next = 0
        self._closed = False
        self._sha = hashlib.sha256()
        self._file = open(self.tmp_path, "wb")
        try:
            self._emit(struct.pack("<Q", len(header_bytes)) + header_bytes)
        except BaseException:
            self.abort()
            raise

    def _emit(self, data) -> None:
        self._file.write(data)
        self._sha.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise ValueError(f"cannot write {name!r}: writer for {self.path} is closed")
        try:
            if self._next >= len(self._specs):
                raise ValueError(f"tensor {name!r} written but all {len(self._specs)} specs are already written")
            want_name, want_shape, want_dtype = self._specs[self._next]
            if name != want_name:
                raise ValueError(f"tensor {name!r} written out of order; expected {want_name!r} next")
            if tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)} dtype {tensor.dtype}; "
                    f"spec says shape {want_shape} dtype {want_dtype}"
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            for start in range(0, data.nbytes, _CHUNK):
                self._emit(memoryview(data[start:start + _CHUNK]))
            self._next += 1
        except BaseException:
            self.abort()
            raise

    def close(self) -> str:
        """Finish the file and return the sha256 hex digest of its bytes."""
        if self._closed:
            raise ValueError(f"writer for {self.path} is already closed")
        try:
            if self._next != len(self._specs):
                missing = [s[0] for s in self._specs[self._next:]]
                raise ValueError(f"closing {self.path} with {len(missing)} tensors unwritten, first {missing[0]!r}")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Drop the partial file; a previous ``path`` is left as it was."""
        self._closed = True
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp_path)

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class LazySafetensors:
    """Read one tensor at a time from an open safetensors file."""

    def __init__(self, handle):
        self._handle = handle

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._handle.keys()

    def get(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype, read from the header (no tensor data is loaded)."""
        return SAFETENSORS_DTYPES[self._handle.get_slice(name).get_dtype()]

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= s
        return n

    def flat_range(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of the flattened tensor, reading only the rows (first-dimension slices)
        that hold them: a ZeRO-3 rank loads about its own share of a tensor, not all of it."""
        shape = self.shape(name)
        if len(shape) < 2:
            return self.get(name).reshape(-1)[start:end]
        row = self.numel(name) // shape[0]
        first, last = start // row, -(-end // row)
        rows = self._handle.get_slice(name)[first:last]
        return rows.reshape(-1)[start - first * row: end - first * row]

    def metadata(self) -> dict[str, str]:
        return self._handle.metadata() or {}


@contextlib.contextmanager
def open_lazy(path: str | os.PathLike) -> Iterator[LazySafetensors]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
        yield LazySafetensors(handle)


Rename = Callable[[str, torch.Tensor], "tuple[str, torch.Tensor] | None"]


def save_zero3_module(
    module: torch.nn.Module,
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    rename: Rename | None = None,
    fp32_master: bool = False,
) -> str | None:
    """Save ``module``'s parameters (not buffers) as float32 safetensors at ``path``.

    Collective under ZeRO-3: every rank must call it. Parameters are gathered one
    at a time with ``deepspeed.zero.GatheredParameters`` (a no-op for ordinary
    parameters, so plain modules work too) and rank 0 streams each one to disk.
    ``rename(name, tensor) -> (name, tensor)`` may change a parameter's name,
    shape or dtype (e.g. logit_scale [1] -> 0-d), or return None to leave the
    parameter out of the file (it is still gathered: the gather is collective). The header is computed up front
    by calling ``rename`` on a meta tensor of the parameter's full shape, so
    ``rename`` must be a function of name, shape and dtype only and must work on
    meta tensors (reshape/squeeze/to do).

    ``fp32_master``: a mixed-precision engine's module (bf16/fp16 parameters): write each trained parameter
    from the optimizer's fp32 master copy (``deepspeed.utils.safe_get_full_fp32_param``, collective
    under ZeRO-3), not its rounded bf16/fp16 value; parameters without one are gathered as usual.

    Returns the file's sha256 on rank 0, None elsewhere. When torch.distributed is
    initialised, ends with a barrier so the file exists once any rank returns.
    """
    import deepspeed  # lazily: importing it is slow and plain-module users need none of it
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    is_writer = (not distributed) or dist.get_rank() == 0
    params = list(module.named_parameters())

    writer = None
    if is_writer:
        specs = []
        for name, p in params:
            full_shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            probe = torch.empty(full_shape, dtype=torch.float32, device="meta")
            renamed = rename(name, probe) if rename else (name, probe)
            if renamed is not None:
                specs.append((renamed[0], tuple(renamed[1].shape), renamed[1].dtype))
        writer = SafetensorsStreamWriter(path, specs, metadata)

    try:
        for name, p in params:
            master = deepspeed.utils.safe_get_full_fp32_param(p) if fp32_master else None
            if master is not None:
                tensor = master.detach().to(device="cpu", dtype=torch.float32).reshape(
                    tuple(getattr(p, "ds_shape", p.shape)))
            else:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    tensor = p.detach().to(device="cpu", dtype=torch.float32).clone() if writer is not None else None
            if writer is not None:
                renamed = rename(name, tensor) if rename else (name, tensor)
                if renamed is not None:
                    writer.write(*renamed)
        digest = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if distributed:
        dist.barrier()
    return digest
