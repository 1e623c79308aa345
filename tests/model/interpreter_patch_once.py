"""Triton's CPU interpreter patches `triton.language` once per kernel launch, and then again on every call
of a nested `@triton.jit` function inside the running kernel (Triton 3.9: `InterpretedFunction.__call__`
calls `_patch_lang` each time and never restores what it set). The nested re-patch is a no-op - the
launch already put the interpreter's versions of the same modules in place, and the nested patch
installs equivalent wrappers over them - but it walks every module with `inspect.getmembers`, which
took about a quarter of the interpreter's time on the engine's decode path (the kernels call small
jitted helpers per tile).

`install()` lets Triton's own `_patch_lang` run at each launch and at the first nested call that sees a
language module not yet patched in this launch (Triton's helpers such as `tl.cdiv` see `triton.language.core`
as well), and skips the repeats. Arithmetic is untouched: the same interpreted ops run.
"""
from __future__ import annotations

import inspect


def install() -> None:
    from triton.runtime import interpreter

    if getattr(interpreter, "_patch_once", False):
        return
    triton_patch_lang = interpreter._patch_lang
    patched: list[set[int]] = []          # per active launch: ids of the language modules patched in it

    def lang_ids(fn) -> set[int]:
        """The language modules Triton's `_patch_lang` would patch for fn (the same test)."""
        tl = interpreter.tl
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    class LaunchScope:
        """The launch's own scope; restoring it ends the launch."""

        def __init__(self, scope, ids):
            self.scope, self.ids = scope, ids

        def restore(self) -> None:
            patched.remove(self.ids)          # the same set object, grown by the nested patches
            self.scope.restore()

    def patch_lang(fn):
        ids = lang_ids(fn)
        caller = inspect.currentframe().f_back.f_code
        if caller is interpreter.GridExecutor.__call__.__code__:           # a kernel launch
            scope = triton_patch_lang(fn)
            patched.append(ids)
            return LaunchScope(scope, ids)
        if patched and ids <= patched[-1]:                                 # nested helper: already patched
            return interpreter._LangPatchScope()
        if patched:
            patched[-1] |= ids
        return triton_patch_lang(fn)

    interpreter._patch_lang = patch_lang
    interpreter._patch_once = True
