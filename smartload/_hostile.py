"""Which globals a checkpoint may name: the hostile list and the list of things known to be data.

Nothing on either list is ever imported or called (nothing the file names is). The hostile list
decides whether smartload refuses the file and names what it found; the data list decides whether
``inspect`` calls a readable file SAFE (every global it names is known to be data) or UNKNOWN
(``torch.load`` without ``weights_only`` would import something smartload does not know).

Both are judged on names alone: whole top-level packages, module prefixes, patterns of names
within one module, and exact names. The hostile list follows families (every loader of another
format, every way to start a process, import a module or open a file), as scanners' deny lists
that name single functions keep being bypassed by the function next door. An attribute that a
method reference reaches through getattr (``getattr(Detect, "forward")``, as pickle protocols
0-3 write ``Detect.forward``) is judged as the global ``module.Detect.forward`` (see
``_unpickler._Getattr``).
"""

from __future__ import annotations

import sys
from fnmatch import fnmatchcase
from functools import lru_cache

__all__ = ["hostile_reason", "is_known_data", "is_plain_data"]

_RUNS_CODE = "callable that can run code or load another pickle"

# -- hostile: whole top-level packages ------------------------------------------------------------

_HOSTILE_PACKAGES = frozenset(
    # processes, the interpreter and imports
    """os posix nt posixpath ntpath subprocess _posixsubprocess sys importlib imp _imp
    _frozen_importlib _frozen_importlib_external zipimport pkgutil modulefinder runpy site
    code codeop types inspect gc atexit signal _signal pty pexpect pipes ctypes _ctypes cffi
    _xxsubinterpreters _interpreters _interpqueues _interpchannels _xxinterpchannels
    _osx_support _aix_support _pyrepl commands popen2 platform sysconfig resource fcntl
    multiprocessing _multiprocessing _posixshmem threading _thread concurrent asyncio _asyncio
    _winapi msvcrt winreg _winreg"""
    # other pickles and serializers, and loaders of formats that run code
    """ pickle _pickle cPickle pickletools marshal shelve dill cloudpickle joblib copyreg yaml
    jinja2 numexpr hydra keras tf_keras tensorflow tensorboard IPython"""
    # debuggers, profilers, test runners, documentation and packaging tools
    """ bdb pdb trace timeit cProfile profile pstats doctest unittest test pydoc idlelib lib2to3
    turtle turtledemo tkinter _tkinter pip ensurepip venv distutils _distutils_hack setuptools
    pkg_resources compileall py_compile zipapp"""
    # files, archives and the network
    """ io _io tempfile glob shutil fileinput filecmp linecache mmap dbm sqlite3 _sqlite3 tarfile
    zipfile gzip bz2 lzma mailbox syslog socket _socket ssl select selectors socketserver
    webbrowser antigravity requests urllib urllib2 urllib3 http httplib httpx aiohttp ftplib
    smtplib smtpd imaplib poplib nntplib telnetlib xmlrpc paramiko huggingface_hub"""
    # code as data: callables that call what they are given (and modules named like builtins)
    """ operator _operator functools eval exec compile difflib logging""".split()
)

# -- hostile: module prefixes (the module itself and everything under it) -------------------------

_HOSTILE_PREFIXES = (
    # torch: compilers, loaders, process groups, test and tooling subpackages
    "torch.jit", "torch.hub", "torch.package", "torch.deploy", "torch.serialization",
    "torch._weights_only_unpickler", "torch.fx", "torch.ops", "torch._ops", "torch._dynamo",
    "torch._inductor", "torch._functorch", "torch.multiprocessing", "torch.distributed",
    "torch._C", "torch.cuda", "torch.backends", "torch.compiler", "torch.export", "torch._export",
    "torch.library", "torch._library", "torch.compile", "torch.onnx", "torch.profiler", "torch.autograd.profiler",
    "torch.testing", "torch._classes", "torch.classes", "torch._jit_internal", "torch._lazy",
    "torch._utils_internal", "torch.utils.cpp_extension", "torch.utils.data",
    "torch.utils.collect_env", "torch.utils._import_utils", "torch.utils.model_zoo",
    "torch.utils.bottleneck", "torch.utils.benchmark", "torch.utils.tensorboard",
    "torch.utils.file_baton", "torch.utils.show_pickle", "torch.utils._config_module",
    "torch.utils.hipify", "torch.utils.jit", "torch.utils.mobile_optimizer",
    "torch.utils.bundled_inputs",
    # numpy: file readers, compilers, test helpers
    "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib", "numpy.lib.npyio",
    "numpy.lib._npyio_impl", "numpy.lib.format", "numpy.lib.utils", "numpy.lib._utils_impl",
    "numpy.lib._datasource",
    # pandas: readers of other formats, the expression evaluator, test helpers
    "pandas.io", "pandas.core.computation", "pandas.testing", "pandas._testing",
    "pandas.util._tester",
    # sympy: string parsers, code generators, test runners
    "sympy.parsing", "sympy.core.sympify", "sympy.core.singleton", "sympy.utilities.lambdify",
    "sympy.utilities.runtests", "sympy.utilities.autowrap", "sympy.utilities.codegen",
    "sympy.testing", "sympy.interactive", "sympy.printing.preview",
    # loaders of pickles or code in other ML libraries
    "transformers.dynamic_module_utils", "mmengine.fileio",
)  # fmt: skip

_PREFIX_SET = frozenset(_HOSTILE_PREFIXES)

# -- hostile: patterns of names within one module --------------------------------------------------

_HOSTILE_NAMES: dict[str, tuple[str, ...]] = {
    "pandas": ("read_*", "eval", "test", "to_pickle"),
    "uuid": ("*",),  # uuid._get_command_stdout and the *_getnode helpers run commands
    "codecs": ("open", "EncodedFile"),
    "sympy": tuple("sympify parse_expr lambdify S init_session test doctest preview".split()),
    "ruamel.yaml": ("load", "load_all", "unsafe_load", "unsafe_load_all", "full_load*"),
    "ruamel.yaml.main": ("load", "load_all", "unsafe_load", "unsafe_load_all", "full_load*"),
    "torch._utils": ("_import_dotted_name",),
    "numpy.ma": ("load", "loads", "dump", "dumps"),
    "numpy.ma.core": ("load", "loads", "dump", "dumps"),
    "numpy.core.records": ("fromfile",),
    "numpy._core.records": ("fromfile",),
    "numpy.rec": ("fromfile",),
    "numpy.core.multiarray": ("fromfile",),
    "numpy._core.multiarray": ("fromfile",),
    "transformers": ("pipeline",),
    "datasets": ("load_dataset", "load_from_disk"),
    "mmengine": ("load",),
    "mmcv": ("load",),
}

_HOSTILE_EXACT = frozenset(
    """torch.load torch.storage._load_from_bytes torch.compile torch.save torch.from_file
    numpy.load numpy.loadtxt numpy.genfromtxt numpy.fromfile numpy.memmap numpy.save numpy.savez
    numpy.savez_compressed numpy.savetxt numpy.fromregex numpy.frompyfunc numpy.vectorize
    numpy.piecewise numpy.apply_along_axis numpy.apply_over_axes numpy.DataSource
    collections.namedtuple""".split()
)

# Builtins that are plain data (the types of a pickle's own values, and Python 2's names for them)
_BENIGN_BUILTINS = frozenset(
    """set frozenset list dict tuple str bytes bytearray int float complex bool slice range
    object Ellipsis NotImplemented unicode long basestring""".split()
)
_BUILTIN_MODULES = ("builtins", "__builtin__", "__builtins__")
# names in hostile families that run nothing: how a pickled logging.Logger comes back,
# Python 2's str → bytes (smartload builds it), and in-memory buffers (older torchtitan train
# states hold io.BytesIO; its class is _io.BytesIO): made from bytes or text, they touch no file
# (_io.open, FileIO, the Buffered* and TextIOWrapper classes that wrap one stay hostile)
_NOT_HOSTILE = frozenset(
    """logging.getLogger _codecs.encode _io.BytesIO _io.StringIO io.BytesIO io.StringIO""".split()
)
# the standard library's private modules (_socket, _posixsubprocess, _pickle ...): internals
# that honest pickles never name
_PRIVATE_STDLIB = frozenset(m for m in sys.stdlib_module_names if m.startswith("_"))

# -- known data: classes and functions whose objects are plain records -----------------------------
# (beside what smartload builds itself: torch's tensor rebuilds, storage types and dtypes, numpy's
# array rebuilds, OrderedDict, _codecs.encode, copyreg._reconstructor, plain builtins)

_TORCH_TENSOR_TYPES = [
    f"torch.{kind}{name}Tensor"
    for kind in ("", "cuda.", "sparse.", "cuda.sparse.")
    for name in "Byte Char Short Int Long Half Float Double BFloat16 Bool".split()
]
_KNOWN_DATA = frozenset(
    """argparse.Namespace types.SimpleNamespace typing.Any
    collections.defaultdict collections.Counter collections.deque
    datetime.date datetime.time datetime.datetime datetime.timedelta datetime.timezone
    decimal.Decimal fractions.Fraction uuid.UUID uuid.SafeUUID
    pathlib.Path pathlib.PosixPath pathlib.WindowsPath pathlib.PurePath pathlib.PurePosixPath
    pathlib.PureWindowsPath pathlib._local.Path pathlib._local.PosixPath
    pathlib._local.WindowsPath pathlib._local.PurePath pathlib._local.PurePosixPath
    pathlib._local.PureWindowsPath
    torch.device torch.storage.TypedStorage torch.per_tensor_affine torch.per_channel_affine
    torch.per_tensor_symmetric torch.per_channel_symmetric torch.per_channel_affine_float_qparams
    numpy.float64 numpy.float32 numpy.int64 numpy.int32 numpy.bool_
    lightning.fabric.utilities.data.AttributeDict lightning_fabric.utilities.data.AttributeDict
    lightning.pytorch.utilities.parsing.AttributeDict
    pytorch_lightning.utilities.parsing.AttributeDict
    omegaconf.dictconfig.DictConfig omegaconf.listconfig.ListConfig omegaconf.base.Metadata
    omegaconf.base.ContainerMetadata omegaconf.nodes.AnyNode omegaconf.nodes.StringNode
    omegaconf.nodes.IntegerNode omegaconf.nodes.FloatNode omegaconf.nodes.BooleanNode
    omegaconf.nodes.BytesNode omegaconf.nodes.PathNode omegaconf.nodes.EnumNode
    mmengine.logging.history_buffer.HistoryBuffer
    transformers.training_args.TrainingArguments transformers.training_args.OptimizerNames
    transformers.training_args_seq2seq.Seq2SeqTrainingArguments
    transformers.trainer_utils.IntervalStrategy transformers.trainer_utils.SchedulerType
    transformers.trainer_utils.HubStrategy transformers.trainer_utils.SaveStrategy
    transformers.trainer_utils.EvaluationStrategy transformers.trainer_utils.FSDPOption
    transformers.trainer_utils.ShardedDDPOption accelerate.utils.dataclasses.DistributedType""".split()
    + _TORCH_TENSOR_TYPES
)


def hostile_reason(qualname: str) -> str | None:
    """Why ``module.name`` is on the hostile list, or None if it is not."""
    if qualname in _KNOWN_DATA or qualname in _NOT_HOSTILE:
        return None
    module, _, name = qualname.rpartition(".")
    if module.split(".", 1)[0] in _BUILTIN_MODULES:
        return None if name in _BENIGN_BUILTINS else "builtin that can run code or touch files"
    if (reason := _module_reason(module)) is not None:
        return reason
    if (
        qualname in _HOSTILE_EXACT
        or name.startswith("__")
        or any(fnmatchcase(name, pattern) for pattern in _HOSTILE_NAMES.get(module, ()))
    ):
        return _RUNS_CODE
    return None


@lru_cache(maxsize=4096)  # a file names many globals of few modules
def _module_reason(module: str) -> str | None:
    """Why everything in ``module`` is hostile, or None."""
    parts = module.split(".")
    if parts[0] in _HOSTILE_PACKAGES or parts[0] in _PRIVATE_STDLIB:
        return f"module {parts[0]!r} can run code or touch the system"
    # __main__: classes of the script that saved the file (torch.save(model) from a notebook),
    # and their methods (__main__.Model, reached through getattr)
    if module.startswith("__") and parts[0] != "__main__":
        return _RUNS_CODE
    prefixes = (".".join(parts[:n]) for n in range(1, len(parts) + 1))
    return _RUNS_CODE if any(p in _PREFIX_SET for p in prefixes) else None


def is_plain_data(qualname: str) -> bool:
    """Whether ``module.name`` is a builtin data type (``builtins.dict``, ``__builtin__.set``):
    data like the pickle's own values, not a class whose objects become inert stand-ins."""
    module, _, name = qualname.rpartition(".")
    return module in _BUILTIN_MODULES and name in _BENIGN_BUILTINS


def is_known_data(qualname: str) -> bool:
    """Whether ``module.name`` is a class whose objects are plain records of values
    (``argparse.Namespace``, ``datetime.datetime``, omegaconf and Lightning containers ...): a file
    naming it is still SAFE, though smartload keeps its objects as inert stand-ins."""
    return qualname in _KNOWN_DATA or is_plain_data(qualname)
