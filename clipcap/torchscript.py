"""The weights of a TorchScript archive (``torch.jit.save``), read without running any of it.

``torch.jit.load`` compiles the code an archive carries and calls its classes' ``__setstate__``
while loading, so opening such a file runs whatever it says. OpenAI's CLIP files are TorchScript
archives, so their tensors are read from the zip alone instead: the module tree of ``data.pkl``
by an unpickler that makes only tensors, containers and inert stand-ins for the modules, each
module's parameter and buffer names from its class's code (parsed as text, never compiled), and
the storages under ``data/``. An archive whose pickle would call anything else, or whose classes
define ``__setstate__``, is refused: it is not a plain module's weights.
"""
from __future__ import annotations

import ast
import collections
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files import ClipCapError

# The storage classes that persistent ids name, by the dtype of their elements.
STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


def is_archive(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with ``constants.pkl``, which ``torch.save`` files lack)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class _Stub:
    """What an object of a TorchScript class unpickles to here: its class name and attributes, inert."""

    qualified_name = ""

    def __new__(cls, *args: Any) -> _Stub:
        if args:
            raise pickle.UnpicklingError(f"{cls.qualified_name} is built with arguments, not as a module")
        stub = super().__new__(cls)
        stub.state = None
        return stub

    def __setstate__(self, state: Any) -> None:  # only kept: pickle's BUILD would otherwise update __dict__
        self.state = state


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *ignored: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2``'s tensor, a view of its storage; gradients and hooks are not kept."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("a tensor without a storage")
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _Unpickler(pickle.Unpickler):
    """Makes tensors, ordered dicts and stubs of ``__torch__`` classes; refuses every other callable."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root = archive, root
        self.stubs: dict[str, type] = {}
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.stubs:
                self.stubs[qualified] = type(name, (_Stub,), {"qualified_name": qualified})
            return self.stubs[qualified]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"its pickle calls {module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """A storage, as a flat tensor of its elements, read from ``data/KEY`` (once, however many tensors share it)."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            info = self.archive.getinfo(f"{self.root}/data/{key}")
            size = numel * dtype.itemsize
            if info.file_size < size:
                raise pickle.UnpicklingError(f"storage data/{key} holds {info.file_size} bytes, not {size}")
            buffer = bytearray(size)
            view, done = memoryview(buffer), 0
            with self.archive.open(info) as f:
                while done < size:
                    n = f.readinto(view[done:])
                    if not n:
                        raise EOFError(f"storage data/{key} ends early")
                    done += n
            self.storages[key] = torch.frombuffer(buffer, dtype=dtype) if size else torch.empty(0, dtype=dtype)
        return self.storages[key]


@dataclass(frozen=True)
class _Class:
    """What the state dict needs of a TorchScript class, from its code."""

    module: bool  # an nn.Module: its parameters and buffers count, and its submodules'
    tensors: tuple[str, ...]  # its parameters, then its buffers


def _read_class(archive: zipfile.ZipFile, root: str, qualified: str, cache: dict[str, ast.Module]) -> _Class:
    """The class's entry in ``code/`` (``__torch__.a.B`` is class B of ``code/__torch__/a.py``), parsed, not run."""
    module, _, name = qualified.rpartition(".")
    source = f"{root}/code/{module.replace('.', '/')}.py"
    if source not in cache:
        try:
            cache[source] = ast.parse(archive.read(source).decode("utf-8"))
        except KeyError:
            raise pickle.UnpicklingError(f"class {qualified} has no code in the archive") from None
        except (SyntaxError, UnicodeDecodeError, ValueError) as e:
            raise pickle.UnpicklingError(f"the code of {qualified} does not parse ({e})") from None
    definition = next((node for node in cache[source].body if isinstance(node, ast.ClassDef) and node.name == name),
                      None)
    if definition is None:
        raise pickle.UnpicklingError(f"class {qualified} has no code in the archive")
    lists: dict[str, tuple[str, ...]] = {}
    for node in definition.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__setstate__":
            raise pickle.UnpicklingError(f"class {qualified} defines __setstate__, which torch.jit.load would run")
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] in (["__parameters__"],
                                                                                            ["__buffers__"]):
            names = ast.literal_eval(node.value)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise pickle.UnpicklingError(f"class {qualified}: {node.targets[0].id} is not a list of names")
            lists[node.targets[0].id] = tuple(names)
    is_module = any(getattr(base, "id", None) == "Module" for base in definition.bases)
    return _Class(is_module, lists.get("__parameters__", ()) + lists.get("__buffers__", ()))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The archive's parameters and buffers by name: what ``torch.jit.load(path).state_dict()`` holds, on the CPU."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ClipCapError(f"{path}: not a TorchScript archive (no single data.pkl)")
            root = pickles[0].removesuffix("/data.pkl")
            if f"{root}/byteorder" in archive.namelist() and archive.read(f"{root}/byteorder").strip() != b"little":
                raise ClipCapError(f"{path}: a big-endian TorchScript archive, which this reader does not convert")
            with archive.open(pickles[0]) as f:
                unpickler = _Unpickler(f, archive, root)
                top = unpickler.load()
            cache: dict[str, ast.Module] = {}
            classes = {name: _read_class(archive, root, name, cache) for name in unpickler.stubs}  # all, checked
            state: dict[str, torch.Tensor] = {}
            _collect(top, "", classes, state)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, RuntimeError, IndexError,
            zipfile.BadZipFile, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ClipCapError(f"{path}: refused as a TorchScript archive: {reason}") from None
    return state


def _collect(obj: Any, prefix: str, classes: dict[str, _Class], state: dict[str, torch.Tensor]) -> None:
    """Add the parameters and buffers of module ``obj`` and of its submodules, named as ``state_dict`` names them."""
    if not isinstance(obj, _Stub) or not classes[obj.qualified_name].module:
        raise pickle.UnpicklingError(f"the archive holds a {type(obj).__name__}, not a module")
    if not isinstance(obj.state, dict):
        raise pickle.UnpicklingError(f"{obj.qualified_name}'s state is a {type(obj.state).__name__}, not attributes")
    for name in classes[obj.qualified_name].tensors:
        value = obj.state.get(name)
        if isinstance(value, torch.Tensor):
            state[prefix + name] = value
        elif value is not None:
            raise pickle.UnpicklingError(f"{prefix + name} is a {type(value).__name__}, not a tensor")
    for name, value in obj.state.items():
        if isinstance(value, _Stub) and classes[value.qualified_name].module:
            _collect(value, f"{prefix}{name}.", classes, state)
