"""Tensors that stay where the graphs run: the translation loop's state on the GPU between steps.

On CUDA, feeding numpy arrays means a host → device copy of every input and a device → host copy
of every output at every call. A decoder step's inputs are mostly the running batch's state — the
encoder's outputs, the cross-attention keys/values, the past keys/values — and its biggest output
is the logits, (rows, vocabulary). So in the resident mode (``Translator(..., resident=True)``,
the default on CUDA):

* graph outputs that feed later calls stay on the device as :class:`DeviceArray` (an ONNX Runtime
  ``OrtValue`` bound with I/O binding), and go back in as inputs without a copy;
* what the loop does to that state between steps — keep some rows (a beam's reordering, finished
  rows leaving), cut padding nobody needs, join a newcomer's rows to the running batch — runs as
  tiny ONNX graphs (Gather + Slice, Pad + Concat) on the same execution provider;
* the logits become each row's ``k`` best log-probabilities and token ids on the device
  (LogSoftmax + TopK); only those, the small per-step inputs (token ids, positions, masks) and the
  step's attention rows cross between host and device.

On the CPU provider the same code runs with ``OrtValue``s in host memory: that is how the tests
prove the resident loop gives the same answers as the numpy one on a machine without a GPU.

ONNX Runtime only — no torch, no CuPy: the op graphs are built with ``onnx.helper`` when first
needed, one per (operation, dtype), and cached on the :class:`DeviceOps` of a model.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import onnxruntime as ort

from service.inference.decoding import TopCandidates

#: ONNX Runtime's type strings of the dtypes a manifest may declare → numpy
ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(uint8)": np.dtype(np.uint8),
}
_END = np.iinfo(np.int64).max  # Slice's "to the end"
#: the op graphs' opset and IR version: ones every ONNX Runtime since 1.15 reads
OPSET, IR_VERSION = 18, 8


class DeviceArray:
    """An ``OrtValue`` on the device of its :class:`DeviceOps`, with what the loop asks of an
    array: ``shape``, ``ndim``, ``dtype``, ``len`` and row selection ``a[index]``."""

    __slots__ = ("dtype", "ops", "shape", "value")

    def __init__(self, value: ort.OrtValue, ops: DeviceOps) -> None:
        self.value, self.ops = value, ops
        self.shape: tuple[int, ...] = tuple(value.shape())
        self.dtype: np.dtype = ORT_DTYPES[value.data_type()]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: np.ndarray) -> DeviceArray:
        return self.ops.take(self, index)

    def numpy(self) -> np.ndarray:
        """A host copy (tests, and answers that need it)."""
        return self.value.numpy()


class DeviceOps:
    """Row operations and top-k on one execution provider's device (``cuda``, or ``cpu``)."""

    def __init__(self, providers: list[str], device_id: int = 0) -> None:
        self.providers = providers
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        self.device_id = device_id
        self._sessions: dict[tuple[str, Any], ort.InferenceSession] = {}
        self._lock = threading.Lock()  # the op cache: a model's loop and its warm-up may race

    # -- moving values ----------------------------------------------------------------------------

    def upload(self, array: np.ndarray) -> DeviceArray:
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)
        return DeviceArray(value, self)

    def run(
        self,
        session: ort.InferenceSession,
        feeds: dict[str, Any],
        resident: list[str],
        host: list[str],
    ) -> dict[str, Any]:
        """``session`` with ``feeds`` (numpy arrays are copied in, :class:`DeviceArray` s are bound
        as they are); ``resident`` outputs stay on the device, ``host`` ones come back as numpy."""
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, DeviceArray):
                binding.bind_ortvalue_input(name, value.value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in resident:
            binding.bind_output(name, self.device, self.device_id)
        for name in host:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        out: dict[str, Any] = {name: DeviceArray(v, self) for name, v in zip(resident, values, strict=False)}
        out |= {name: v.numpy() for name, v in zip(host, values[len(resident) :], strict=True)}
        return out

    # -- the row operations ------------------------------------------------------------------------

    def take(
        self, x: DeviceArray, index: np.ndarray, axis: int = 0, start: int = 0, stop: int | None = None
    ) -> DeviceArray:
        """``x[index]`` (rows), cut to ``start:stop`` along ``axis``: one Gather + Slice."""
        return self.take_all([x], index, [axis], start, stop)[0]

    def join(self, arrays: list[DeviceArray], axis: int, width: int, left: bool = False) -> DeviceArray:
        """The rows of ``arrays`` in one, each padded with zeros to ``width`` along ``axis`` (on
        the left when ``left``): ``service.inference.translation.join`` on the device."""
        if len(arrays) == 1:
            x = arrays[0]
            return x if x.shape[axis] == width else self.pad(x, axis, width, left)
        out = arrays[0]
        for b in arrays[1:]:  # pairwise: the loop joins two (the running batch and newcomers)
            out = self.join_all([(out, b)], [axis], width, left)[0]
        return out

    def take_all(
        self,
        xs: list[DeviceArray],
        index: np.ndarray,
        axes: list[int],
        start: int = 0,
        stop: int | None = None,
    ) -> list[DeviceArray]:
        """:meth:`take` of the same rows from every array of ``xs`` (each cut along its own axis)
        in one graph run: a batch's state is a dozen tensors, and on CUDA each run costs its
        launch and binding whatever its size."""
        feeds: dict[str, Any] = {"index": np.asarray(index, dtype=np.int64)}
        for i, (x, axis) in enumerate(zip(xs, axes, strict=True)):
            feeds |= {
                f"x{i}": x,
                f"starts{i}": np.array([start], dtype=np.int64),
                f"ends{i}": np.array([_END if stop is None else stop], dtype=np.int64),
                f"axes{i}": np.array([axis % x.ndim], dtype=np.int64),
            }
        names = [f"y{i}" for i in range(len(xs))]
        out = self.run(self._session("take_all", tuple(x.dtype for x in xs)), feeds, names, [])
        return [out[n] for n in names]

    def join_all(
        self, pairs: list[tuple[DeviceArray, DeviceArray]], axes: list[int], width: int, left: bool = False
    ) -> list[DeviceArray]:
        """:meth:`join` of several pairs (the running batch's tensors and a newcomer's) in one
        graph run."""
        feeds: dict[str, Any] = {}
        for i, ((a, b), axis) in enumerate(zip(pairs, axes, strict=True)):
            feeds |= {
                f"a{i}": a,
                f"b{i}": b,
                f"pads_a{i}": _pads(a, axis, width, left),
                f"pads_b{i}": _pads(b, axis, width, left),
            }
        names = [f"y{i}" for i in range(len(pairs))]
        out = self.run(self._session("join_all", tuple(a.dtype for a, _ in pairs)), feeds, names, [])
        return [out[n] for n in names]

    def pad(self, x: DeviceArray, axis: int, width: int, left: bool = False) -> DeviceArray:
        feeds = {"x": x, "pads": _pads(x, axis, width, left)}
        return self.run(self._session("pad", x.dtype), feeds, ["y"], [])["y"]

    def top(self, logits: DeviceArray, k: int) -> TopCandidates:
        """Each row's ``k`` best tokens by log-softmax of ``logits`` (N, V), computed in float32
        on the device; only (N, k) values and ids come back."""
        k = min(k, logits.shape[-1])
        feeds = {"logits": logits, "k": np.array([k], dtype=np.int64)}
        out = self.run(self._session("top", logits.dtype), feeds, [], ["logp", "ids"])
        return TopCandidates(out["logp"], out["ids"])

    def _session(self, op: str, dtype: np.dtype | tuple[np.dtype, ...]) -> ort.InferenceSession:
        """``op``'s graph for ``dtype`` (the ``*_all`` ops: one dtype per array they take)."""
        key = (op, dtype if isinstance(dtype, tuple) else np.dtype(dtype))
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1
                options.inter_op_num_threads = 1
                model = _BUILDERS[op](key[1])
                session = ort.InferenceSession(model, sess_options=options, providers=self.providers)
                self._sessions[key] = session
            return session


def _pads(x: DeviceArray, axis: int, width: int, left: bool) -> np.ndarray:
    """ONNX Pad's ``pads`` (begins, then ends) that take ``x`` to ``width`` along ``axis``."""
    pads = np.zeros(2 * x.ndim, dtype=np.int64)
    extra = max(0, width - x.shape[axis])
    pads[axis if left else x.ndim + axis] = extra
    return pads


# -- the op graphs (onnx.helper; onnx is only imported when a resident loop first needs one) --------


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any]) -> bytes:
    from onnx import helper

    graph = helper.make_graph(nodes, "attention-serve-device-op", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model.SerializeToString()


def _tensor(name: str, dtype: np.dtype | type) -> Any:
    from onnx import helper

    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)


def _take_all(dtypes: tuple[np.dtype, ...]) -> bytes:
    from onnx import helper

    nodes: list[Any] = []
    inputs, outputs = [_tensor("index", np.int64)], []
    for i, dtype in enumerate(dtypes):
        nodes += [
            helper.make_node("Gather", [f"x{i}", "index"], [f"rows{i}"], axis=0),
            helper.make_node("Slice", [f"rows{i}", f"starts{i}", f"ends{i}", f"axes{i}"], [f"y{i}"]),
        ]
        inputs += [
            _tensor(f"x{i}", dtype),
            *(_tensor(f"{n}{i}", np.int64) for n in ("starts", "ends", "axes")),
        ]
        outputs.append(_tensor(f"y{i}", dtype))
    return _model(nodes, inputs, outputs)


def _join_all(dtypes: tuple[np.dtype, ...]) -> bytes:
    from onnx import helper

    nodes: list[Any] = []
    inputs, outputs = [], []
    for i, dtype in enumerate(dtypes):
        nodes += [
            helper.make_node("Pad", [f"a{i}", f"pads_a{i}"], [f"a_padded{i}"]),
            helper.make_node("Pad", [f"b{i}", f"pads_b{i}"], [f"b_padded{i}"]),
            helper.make_node("Concat", [f"a_padded{i}", f"b_padded{i}"], [f"y{i}"], axis=0),
        ]
        inputs += [_tensor(f"a{i}", dtype), _tensor(f"b{i}", dtype)]
        inputs += [_tensor(f"pads_a{i}", np.int64), _tensor(f"pads_b{i}", np.int64)]
        outputs.append(_tensor(f"y{i}", dtype))
    return _model(nodes, inputs, outputs)


def _pad(dtype: np.dtype) -> bytes:
    from onnx import helper

    nodes = [helper.make_node("Pad", ["x", "pads"], ["y"])]
    return _model(nodes, [_tensor("x", dtype), _tensor("pads", np.int64)], [_tensor("y", dtype)])


def _top(dtype: np.dtype) -> bytes:
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["logits"], ["logits32"], to=TensorProto.FLOAT),
        helper.make_node("LogSoftmax", ["logits32"], ["all"], axis=-1),
        helper.make_node("TopK", ["all", "k"], ["logp", "ids"], axis=-1, largest=1, sorted=1),
    ]
    inputs = [_tensor("logits", dtype), _tensor("k", np.int64)]
    return _model(nodes, inputs, [_tensor("logp", np.float32), _tensor("ids", np.int64)])


_BUILDERS: dict[str, Any] = {
    "pad": _pad,
    "top": _top,
    "take_all": _take_all,
    "join_all": _join_all,
}
