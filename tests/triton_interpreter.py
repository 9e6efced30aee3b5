"""The Triton interpreter as the suite runs it (TRITON_INTERPRET=1, tests/conftest.py), two settings of its cost:

- `skip_repeated_language_patches`: the interpreter swaps triton.language's builtins for interpreted ones when a
  launch starts (and restores them when it ends) and again on every call of a @triton.jit helper inside it, by
  walking the language modules' members each time. Within a launch the later swaps change nothing when the helper
  sees no language module the launch has not already swapped, so they are skipped; a helper that does (triton's
  own `tl.sum` reads `triton.language.core`) still swaps it, once per launch.
- `overflow_checks(on)`: with the checks on, every 32-bit integer add, sub and mul of a kernel is redone in int64
  and a result outside int32 fails the launch with "int32 overflow detected". Triton asserts this only in debug
  mode (TRITON_DEBUG=1): by default its interpreter computes every check and then drops it. On turns on both the
  check and debug mode; off turns off both (nothing computed).
"""
import dataclasses
import inspect

import triton.language as tl
from triton.runtime import interpreter

_launch_langs = []  # per running launch: ids of the language modules swapped so far
_module_langs = {}  # id(module globals) -> ids of the language modules those globals hold


def _langs(fn):
    key = id(fn.__globals__)
    if key not in _module_langs:
        _module_langs[key] = frozenset(id(v) for v in fn.__globals__.values()
                                       if inspect.ismodule(v) and v in (tl, tl.core))
    return _module_langs[key]


class _NothingToRestore:
    def restore(self):
        pass


def skip_repeated_language_patches():
    """Install the skip (idempotent). Returns False, changing nothing, when this triton's interpreter does not have
    the function it wraps."""
    patch = getattr(interpreter, "_patch_lang", None)
    if patch is None or getattr(patch, "skips_repeats", False):
        return patch is not None

    def patch_once_per_launch(fn):
        langs = _langs(fn)
        if _launch_langs and langs <= _launch_langs[-1]:
            return _NothingToRestore()
        scope = patch(fn)
        if _launch_langs:  # a helper call: the interpreter never restores its scope (the launch's restore does)
            _launch_langs[-1] |= langs
            return scope
        _launch_langs.append(set(langs))
        restore = scope.restore

        def restore_and_end_launch():
            _launch_langs.pop()
            restore()
        scope.restore = restore_and_end_launch
        return scope

    patch_once_per_launch.skips_repeats = True
    patch_once_per_launch.__wrapped__ = patch
    interpreter._patch_lang = patch_once_per_launch
    return True


def overflow_checks(on):
    """Turn the interpreter's 32-bit integer overflow checks on or off for the launches that follow."""
    builder = interpreter.interpreter_builder
    if overflow_checks_on() != on:
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=on, debug=on)


def overflow_checks_on():
    options = interpreter.interpreter_builder.options
    return options.sanitize_overflow and options.debug
