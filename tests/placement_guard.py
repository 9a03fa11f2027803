"""A device-placement guard for tests without a GPU (issue 27 part 5; docs/gpu.md "Device
placement").

What a first GPU run hits is a tensor made on the wrong device: a constructor without
``device=`` (``torch.zeros(n)`` beside CUDA activations), a batch or a received tensor never
moved, ``.cpu()`` in the middle of a step. On the CPU all of these are invisible: every tensor
is on the CPU. The guard makes them visible by giving the engines a device of their own that
is not the CPU:

* the engines are told to train on ``meta`` (the test replaces ``runner.device.resolve``),
  the one non-CPU device type PyTorch's CPU build runs autograd on;
* a tensor "on meta" here is a :class:`OnDevice`: a wrapper that reports ``device='meta'``
  and holds its data in a CPU tensor, so a whole training step runs and its numbers are the
  CPU's (``float(loss)`` works, data-dependent shapes work);
* :class:`PlacementGuard`, a ``TorchDispatchMode``, sees every ATen op: a factory or a
  ``.to()`` aimed at ``meta`` makes an :class:`OnDevice`, an op on :class:`OnDevice` inputs
  makes :class:`OnDevice` outputs, and an op that mixes them with a plain CPU tensor of one
  or more dimensions is recorded with the line of ``runner/`` that ran it. That is exactly
  CUDA's rule: CPU and CUDA tensors do not mix, except 0-dim CPU scalars, copies across
  devices, ``.to()``, and CPU index tensors;
* stricter than CUDA, a tensor of one or more dimensions that engine code itself creates on
  the CPU (``torch.zeros(n)`` called from runner/, without ``device=``) is recorded too, even
  if it only meets device tensors through copies (legal on CUDA, but a host round trip on
  every step). The host-side code that builds tensors on the CPU on purpose is listed in
  :data:`HOST_SIDE`.

Unlike plain ``meta`` tensors (a matmul of a meta and a CPU tensor does not raise, an
addition does, and nothing can be read back), the guard misses no op and the step's results
are real. What it cannot see is CUDA itself (kernels, streams, memory caps): that is
bench/gpu_check.py's, on a GPU.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("meta")
RUNNER = str(Path(__file__).resolve().parents[1] / "runner")
aten = torch.ops.aten

# Device changes (``aten.to`` reaches a dispatch mode undecomposed in inference mode).
MOVES = {aten._to_copy.default, aten.to.device, aten.to.dtype_layout, aten.to.other}
# Ops CUDA lets mix devices: copies across devices, device changes, CPU index tensors.
CROSSING = {aten.copy_.default, *MOVES, aten.index.Tensor,
            aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
CPU = torch.device("cpu")
# runner/ code that makes CPU tensors on purpose: batches are collated on the host and moved
# once (runner/device.py ``to``), wire tensors are decoded on the host and landed by the
# transport, and LoRA's initial A comes from a CPU generator so a GPU run starts from the
# CPU's numbers (runner/model/lora.py ``reinit_adapters``).
HOST_SIDE = ("runner/dataset/", "runner/distributed/protocol/", "runner/model/lora.py")


class OnDevice(torch.Tensor):
    """A tensor that says it lives on :data:`FAKE` and keeps its data in ``inner`` (CPU)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> OnDevice:
        r = torch.Tensor._make_wrapper_subclass(
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, layout=inner.layout, device=FAKE,
            requires_grad=inner.requires_grad)
        r.inner = inner
        return r

    # What CUDA tensors answer from host memory too (and wrappers have no storage of their own)
    def data_ptr(self) -> int:  # type: ignore[override]
        return self.inner.data_ptr()

    def untyped_storage(self) -> Any:  # type: ignore[override]
        return self.inner.untyped_storage()

    def tolist(self) -> Any:  # type: ignore[override]
        return self.inner.tolist()

    def numpy(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise TypeError("can't convert a device tensor to numpy: use .cpu() first "
                        "(what CUDA says too)")

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return f"OnDevice({self.inner!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        guard = PlacementGuard.active
        if guard is None:
            raise RuntimeError(f"{func} on a guarded tensor outside PlacementGuard")
        return guard.run(func, args, kwargs or {})


@dataclass
class Violation:
    """An op that mixed device and CPU tensors: what CUDA would refuse."""

    op: str
    cpu_shapes: list[tuple[int, ...]]
    where: str

    def __str__(self) -> str:
        return f"{self.op} with CPU tensor(s) {self.cpu_shapes} at {self.where}"


def _short(frame: traceback.FrameSummary) -> str:
    return f"{frame.filename.removeprefix(str(Path(RUNNER).parent) + '/')}:{frame.lineno}"


def _where() -> str:
    """The innermost line of runner/ on the stack (else the innermost line outside torch)."""
    frames = traceback.extract_stack()[:-3]
    mine = [f for f in frames if f.filename.startswith(RUNNER)]
    pick = mine[-1] if mine else next(
        (f for f in reversed(frames) if "/torch/" not in f.filename), frames[-1])
    return _short(pick)


def _engine_caller() -> str | None:
    """``file:line`` when the code that called torch directly is an engine file of runner/
    (not :data:`HOST_SIDE`), else None."""
    for f in reversed(traceback.extract_stack()[:-3]):
        if "/torch/" in f.filename or f.filename == __file__:
            continue
        where = _short(f)
        if f.filename.startswith(RUNNER) and not where.startswith(HOST_SIDE):
            return where
        return None
    return None


class PlacementGuard(TorchDispatchMode):
    """Records every op that mixes :class:`OnDevice` tensors with CPU tensors (see the module
    docstring). Use :func:`guarded`."""

    active: PlacementGuard | None = None

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[Violation] = []
        self.errors: list[BaseException] = []
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        return self.run(func, args, kwargs or {})

    def run(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        self.ops += 1
        flat, _ = tree_flatten((args, kwargs))
        placed = [t for t in flat if isinstance(t, OnDevice)]
        plain = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice)]
        targets = [x for x in flat if isinstance(x, torch.device)]
        to_fake = any(d.type == FAKE.type for d in targets)
        if placed and func not in CROSSING:
            bad = [tuple(t.shape) for t in plain if t.dim() > 0 or t.device.type != "cpu"]
            if bad:
                self.violations.append(Violation(str(func), bad, _where()))
        created_on_cpu = not placed and not plain and not to_fake

        def inner(x: Any) -> Any:
            if isinstance(x, OnDevice):
                return x.inner
            if isinstance(x, torch.device) and x.type == FAKE.type:
                return CPU
            return x

        inner_args, inner_kwargs = tree_map(inner, (args, kwargs))
        out = func(*inner_args, **inner_kwargs)
        # a move to another device (.cpu(), .to(other CPU tensor)) leaves the guarded one
        leaving = func in MOVES and not to_fake and (
            bool(targets) or (func is aten.to.other and not isinstance(args[1], OnDevice)))
        if leaving or not (placed or to_fake):
            if created_on_cpu:
                # (empty ones are safetensors' reads: storage set right after, on the host)
                made = [tuple(o.shape) for o in tree_flatten(out)[0]
                        if isinstance(o, torch.Tensor) and o.dim() > 0 and o.numel() > 0
                        and not o.is_meta]
                where = _engine_caller() if made else None
                if where is not None:
                    self.violations.append(Violation(f"{func} (made on the CPU)", made, where))
            return out
        # in-place and out= ops return an input: give back that very object
        by_inner = {id(t.inner): t for t in placed}
        if not to_fake:  # a move to the device returns a CPU input itself: it must wrap
            by_inner.update({id(t): t for t in plain})

        def wrap(o: Any) -> Any:
            if isinstance(o, torch.Tensor) and not isinstance(o, OnDevice):
                same = by_inner.get(id(o))
                return OnDevice(o) if same is None else same
            return o

        return tree_map(wrap, out)

    def threaded(self, fn: Any) -> Any:
        """``fn`` wrapped to run under a guard of its own thread (dispatch modes are
        per-thread) that records into this one's violations; its exception is kept in
        ``errors``."""
        def run(*args: Any, **kwargs: Any) -> Any:
            mine = PlacementGuard()
            mine.violations = self.violations
            try:
                with _FromData(), mine:
                    return fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - reported by the test
                self.errors.append(e)
                raise
        return run

    def check(self) -> None:
        """Fail with every recorded violation (grouped by where it happened)."""
        if self.violations:
            lines = sorted({str(v) for v in self.violations})
            raise AssertionError(f"{len(self.violations)} op(s) mixed the training device "
                                 "with the CPU:\n  " + "\n  ".join(lines))


class _FromData(TorchFunctionMode):
    """``torch.tensor(data, device='meta')`` copies its data below the dispatcher (only an
    empty meta tensor reaches a dispatch mode): made on the CPU here, then moved through the
    guard as ``.to('meta')``, as CUDA would copy it."""

    FROM_DATA = (torch.tensor, torch.as_tensor, torch.asarray)

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        target = kwargs.get("device")
        if func in self.FROM_DATA and target is not None \
                and torch.device(target).type == FAKE.type:
            return func(*args, **{**kwargs, "device": "cpu"}).to(FAKE)
        return func(*args, **kwargs)


@contextmanager
def guarded() -> Iterator[PlacementGuard]:
    """The guard, active on this thread (for the engines' ops and their tensors' own
    dispatch); :meth:`PlacementGuard.threaded` runs a function under it on another thread."""
    guard = PlacementGuard()
    PlacementGuard.active = guard
    try:
        with _FromData(), guard:
            yield guard
    finally:
        PlacementGuard.active = None


def on_device(t: torch.Tensor) -> bool:
    """Whether ``t`` is on the guarded device (an :class:`OnDevice`)."""
    return isinstance(t, OnDevice)
