"""The hostile list: globals whose mere presence marks a checkpoint as an attack.

Nothing on it is ever imported or called (nothing the file names is); the list decides whether
smartload refuses the file and names what it found.
"""

from __future__ import annotations

__all__ = ["hostile_reason", "is_plain_data"]

# Judged on the module's top-level package, a prefix, or exact names.

_HOSTILE_PACKAGES = frozenset(
    """os posix nt posixpath ntpath subprocess _posixsubprocess sys importlib imp runpy pickle
    _pickle cPickle pickletools marshal ctypes _ctypes pty socket _socket shutil timeit cProfile
    profile pstats pydoc pip code codeop webbrowser multiprocessing threading _thread signal
    tempfile glob io _io commands popen2 platform asyncio bdb pdb trace site zipimport types
    inspect gc ensurepip venv distutils setuptools pkg_resources requests urllib urllib2 urllib3
    http httplib ftplib smtplib telnetlib xmlrpc shelve dill cloudpickle joblib operator _operator
    sysconfig linecache dbm sqlite3 ssl select selectors mmap resource fcntl""".split()
)
_HOSTILE_PREFIXES = (
    "torch.jit", "torch.hub", "torch.package", "torch.serialization", "torch.fx", "torch.ops",
    "torch._ops", "torch._dynamo", "torch._inductor", "torch.multiprocessing", "torch.distributed",
    "torch.utils.cpp_extension", "torch.utils.data", "torch._C", "torch.cuda", "torch.compiler",
    "torch.export", "torch._export", "torch.library", "torch._library",
    "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib", "numpy.lib.npyio",
    "numpy.lib._npyio_impl", "numpy.lib.format", "numpy.lib.utils", "numpy.lib._utils_impl",
    "numpy.lib.format",
)  # fmt: skip
_HOSTILE_EXACT = frozenset(
    """torch.load torch.storage._load_from_bytes torch.compile torch.save functools.partial
    functools.reduce functools.partialmethod functools.wraps functools.update_wrapper copyreg.__newobj__
    copyreg.__newobj_ex__ copyreg._reconstructor_unsafe numpy.load numpy.loadtxt numpy.genfromtxt
    numpy.fromfile numpy.memmap numpy.save numpy.savez numpy.savez_compressed numpy.savetxt
    numpy.fromregex numpy.frompyfunc numpy.vectorize numpy.piecewise numpy.apply_along_axis
    numpy.apply_over_axes collections.namedtuple""".split()
)
# Builtins that are plain data (the types of a pickle's own values, and Python 2's names for them)
_BENIGN_BUILTINS = frozenset(
    """set frozenset list dict tuple str bytes bytearray int float complex bool slice range
    object Ellipsis NotImplemented unicode long basestring""".split()
)
_BUILTIN_MODULES = ("builtins", "__builtin__", "__builtins__")


def hostile_reason(qualname: str) -> str | None:
    """Why ``module.name`` is on the hostile list, or None if it is not."""
    module, _, name = qualname.rpartition(".")
    top = module.split(".", 1)[0]
    if top in _BUILTIN_MODULES:
        return None if name in _BENIGN_BUILTINS else "builtin that can run code or touch files"
    if top in _HOSTILE_PACKAGES:
        return f"module {top!r} can run code or touch the system"
    # __main__: classes of the script that saved the file (torch.save(model) from a notebook)
    if (
        qualname in _HOSTILE_EXACT
        or name.startswith("__")
        or (module.startswith("__") and module != "__main__")
    ):
        return "callable that can run code or load another pickle"
    if any(module == p or module.startswith(p + ".") or qualname == p for p in _HOSTILE_PREFIXES):
        return "callable that can run code or load another pickle"
    return None


def is_plain_data(qualname: str) -> bool:
    """Whether ``module.name`` is a builtin data type (``builtins.dict``, ``__builtin__.set``):
    data like the pickle's own values, not a class whose objects become inert stand-ins."""
    module, _, name = qualname.rpartition(".")
    return module in _BUILTIN_MODULES and name in _BENIGN_BUILTINS
