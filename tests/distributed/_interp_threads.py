"""Test helper: run the programs of a TRITON_INTERPRET grid *concurrently* (one thread each).

The stock interpreter runs program 0, 1, ... one after another, so a kernel whose program p
waits for another program (``protocol="lamport"`` with ``shift != 0``) cannot run there, and
orderings that only occur on a GPU (a receiving program running before, during or after the
sending one, programs of one rank finishing in any order) are never exercised. ``install()``
patches the interpreter of this process (call it in the rank worker, tests only):

* ``program_id`` becomes thread-local and every program of a grid runs in its own thread;
* atomics take one process-wide lock (numpy read-modify-write is not atomic across threads);
* a volatile load sleeps a random few microseconds first, which shuffles the interleaving
  (seeded) and keeps spinning programs from starving the others of the GIL.

Only what the kernels need is covered (1-D grids, no ``tl.debug_barrier`` semantics: the
kernels under test use it only in front of an acq_rel atomic). Written against the
triton 3.x interpreter (``GridExecutor.__call__``); ``install`` raises if that changed.
"""

from __future__ import annotations

import inspect
import random
import sys
import threading
import time


def install(seed: int = 0, max_sleep_us: float = 50.0) -> None:
    import triton
    from triton.runtime import interpreter as I

    b = I.interpreter_builder
    cls = type(b)
    if getattr(cls, "_llmcomm_threaded", False):
        return
    tls = threading.local()
    cls.grid_idx = property(lambda self: getattr(tls, "grid_idx", None),
                            lambda self, v: setattr(tls, "grid_idx", v))
    lock = threading.RLock()
    for name in ("create_atomic_rmw", "create_atomic_cas"):
        orig = getattr(cls, name)

        def locked(self, *a, _orig=orig, **k):
            with lock:
                return _orig(self, *a, **k)
        setattr(cls, name, locked)
    rng = random.Random(seed)
    orig_load = cls.create_masked_load

    def load(self, ptrs, mask, other, *cache_and_volatile):
        # the cache arguments differ across Triton releases (3.8: cache_modifier,
        # eviction_policy; 3.9: cache_policy); is_volatile is the last in every one
        if cache_and_volatile[-1]:
            time.sleep(rng.random() * max_sleep_us * 1e-6)
        return orig_load(self, ptrs, mask, other, *cache_and_volatile)
    cls.create_masked_load = load

    ge = I.GridExecutor
    src = inspect.getsource(ge.__call__)
    if "interpreter_builder.set_grid_idx(x, y, z)" not in src:
        raise RuntimeError("triton interpreter changed: _interp_threads cannot patch it")

    def call(self, *args_dev, **kwargs):
        argspec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in argspec.args or k in argspec.kwonlyargs}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        for hook in self.pre_run_hooks:
            hook(*args_hst, **kwargs_hst)
        patch_scope = I._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {name: arg if name in self.constexprs else I._implicit_cvt(arg)
                    for name, arg in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1, ) * (3 - len(grid))
            assert grid[1] == grid[2] == 1, "threaded interpreter: 1-D grids only"
            b.set_grid_dim(*grid)
            errors = []

            def run(x):
                try:
                    b.set_grid_idx(x, 0, 0)
                    self.fn(**args)
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    errors.append(e)
            order = list(range(grid[0]))
            rng.shuffle(order)              # start order is not program order on a GPU
            threads = [threading.Thread(target=run, args=(x,), daemon=True) for x in order]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise I.InterpreterError(repr(errors[0])) from errors[0]
        finally:
            patch_scope.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    ge.__call__ = call

    # A nested jit call patches triton.language again, iterating the callee's module globals;
    # another thread can add to those meanwhile (e.g. ``__warningregistry__`` of a warning),
    # and the iteration raises "dictionary changed size during iteration" (seen once in
    # session 6). Retry: a half-applied patch only installs what the retry installs again.
    patch_lang = I._patch_lang

    def patch_lang_retrying(fn):
        for _ in range(99):
            try:
                return patch_lang(fn)
            except RuntimeError as e:
                if "changed size during iteration" not in str(e):
                    raise
        return patch_lang(fn)
    I._patch_lang = patch_lang_retrying
    sys.setswitchinterval(1e-4)
    cls._llmcomm_threaded = True
    del triton
