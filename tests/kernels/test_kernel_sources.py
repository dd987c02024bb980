"""A Triton kernel calls the JIT helpers of other ditq modules by their bare names, never as `module.helper`.

torch.compile re-emits a `triton_op`'s kernels into its generated code together with the JIT functions they name as
globals; a helper reached through a module attribute is not carried along, so the kernel compiled on a GPU fails
with "NameError: <module> is not defined" although it runs under the interpreter and eagerly. Neither the CPU
interpreter nor the sm_90 compile checks see it, hence this check of the sources.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap
import types

import pytest
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import ditq.kernels.triton as kernels_package

KERNEL_TYPES = (JITFunction, InterpretedFunction)  # the tests run kernels under the interpreter


def _jit_functions() -> list[tuple[str, JITFunction]]:
    found = []
    for info in pkgutil.iter_modules(kernels_package.__path__):
        module = importlib.import_module(f"{kernels_package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, KERNEL_TYPES) and value.fn.__module__ == module.__name__:
                found.append((f"{info.name}.{name}", value))
    return found


def _ditq_modules_reached_by_attribute(fn: JITFunction) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
    scope = fn.fn.__globals__
    return {
        node.value.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and isinstance(scope.get(node.value.id), types.ModuleType)
        and scope[node.value.id].__name__.startswith("ditq")
    }  # fmt: skip


def test_the_kernel_package_has_jit_functions():
    assert len(_jit_functions()) >= 10


@pytest.mark.parametrize("name, fn", _jit_functions(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_kernel_reaches_a_ditq_module_by_attribute(name, fn):
    assert not _ditq_modules_reached_by_attribute(fn), f"{name} calls helpers as module attributes"
