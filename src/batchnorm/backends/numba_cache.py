"""numba's on-disk cache for the numba backend's kernels, made safe to share and to lose.

numba keeps compiled machine code on disk so that a process does not compile again what
another already did. Three things about that cache must never reach a user:

- **Where it lives.** numba looks for a writable place next to the source (`__pycache__`)
  or in the user's cache folder; in a read-only container with a read-only HOME it finds
  none and every cached function fails at its *definition*, so `import batchnorm` failed
  even for `backend="aten"`. Here a last location is added after numba's own: a folder of
  this user's in the system's temporary directory. If even that cannot be written, the
  kernels run uncached (compiled in each process) and a warning says so once.
- **A damaged file.** A truncated or garbage index or data file (a killed process, a full
  disk) made every later load raise `UnpicklingError`. A load that fails that way now
  empties that function's index, compiles anew, and warns once.
- **Symbols.** numba names a compiled function's machine code from its module, qualified
  name, argument types and a counter that restarts in every process. Two different
  functions under one qualified name, compiled in two processes, can thus get one symbol;
  a process that loads both from the cache links one kernel to the other's code, and the
  results are silently wrong. Every function this package makes at run time therefore gets
  a name of its own (`unique_name`), and no name is given twice.

`jit(fn, **options)` is `numba.njit` with this cache; `cache=False` (inlined helpers, which
are compiled into their callers) gives no cache at all.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings

try:
    import numba
    from numba.core import caching
except ImportError:  # the package imports without numba; numba_kernels says why
    numba = caching = None

#: Errors that loading a damaged cache file raises (pickle's, a short read, bad bytes).
_DAMAGED = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError)

_warned: set[str] = set()
_names: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"batchnorm: {message}", RuntimeWarning, stacklevel=3)


def fallback_dir() -> str:
    """The cache folder used when numba finds no writable one of its own: per user, in the
    system's temporary directory (TMPDIR, else /tmp)."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return os.path.join(tempfile.gettempdir(), f"batchnorm-numba-cache-{user}")


def unique_name(fn, name: str):
    """Give `fn`, a function made at run time, the qualified name `name`, which no other
    function of this process may have (the module docstring says why); returns `fn`."""
    if name in _names:
        raise RuntimeError(f"two run-time kernels named {name!r}: their cached machine code would collide")
    _names.add(name)
    fn.__qualname__ = fn.__name__ = name
    return fn


if caching is not None:

    class _TempDirLocator(caching.UserProvidedCacheLocator):
        """numba's locator for a user-given folder, pointed at `fallback_dir()`."""

        def __init__(self, py_func, py_file):
            super().__init__(py_func, py_file)
            self._cache_path = os.path.join(fallback_dir(), self.get_suitable_cache_subpath(py_file))

        @classmethod
        def from_function(cls, py_func, py_file):
            self = cls(py_func, py_file)
            try:
                self.ensure_cache_path()
            except OSError:
                return None
            _warn_once(
                "fallback",
                f"numba cannot write its cache next to batchnorm's sources or in the user's cache "
                f"folder; the kernels are cached in {fallback_dir()} (set NUMBA_CACHE_DIR to choose)",
            )
            return self

    class _Impl(caching.CompileResultCacheImpl):
        _locator_classes = [*caching.CompileResultCacheImpl._locator_classes, _TempDirLocator]

    class _KernelCache(caching.FunctionCache):
        """numba's function cache with the fallback location, and loads that survive damage."""

        _impl_class = _Impl

        def load_overload(self, sig, target_context):
            try:
                return super().load_overload(sig, target_context)
            except _DAMAGED as error:
                _warn_once(
                    "damaged",
                    f"a damaged numba cache file in {self.cache_path} ({type(error).__name__}: {error}); "
                    "its kernels are compiled again and the file replaced",
                )
                try:
                    self.flush()
                except OSError:
                    self.disable()
                return None


def jit(fn=None, *, cache: bool = True, **options):
    """numba.njit(**options) for `fn`, with this module's cache when `cache` (usable as a
    decorator with options: `@jit(parallel=True)`)."""
    if fn is None:
        return lambda f: jit(f, cache=cache, **options)
    dispatcher = numba.njit(**options)(fn)
    if cache:
        try:
            # what Dispatcher.enable_caching does, with our cache class
            dispatcher._cache = _KernelCache(dispatcher.py_func)
        except (RuntimeError, OSError) as error:
            _warn_once(
                "uncached",
                f"no writable folder for numba's cache ({error}); the kernels are compiled in every "
                "process. Set NUMBA_CACHE_DIR to a writable folder to keep them.",
            )
    return dispatcher
