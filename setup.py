"""Builds the optional CPU training kernel ``ml.fastpath._tanh_mlp`` (metadata lives in pyproject.toml).

Without a working C++ compiler with OpenMP the build is skipped with a warning, and CPU
training takes the plain torch backward (see ``ml/fastpath/dense.py``).
"""

import warnings

from setuptools import setup

try:  # torch is needed to build the kernel; with build isolation it is absent and the kernel is skipped
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    BuildExtension = None


def kernel_build() -> dict:
    if BuildExtension is None:
        warnings.warn("torch is not importable at build time: ml.fastpath._tanh_mlp is not built, CPU "
                      "training will use the plain torch backward (make venv builds it)", stacklevel=1)
        return {}

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=False)):
        def run(self):
            try:
                super().run()
            except Exception as error:  # no compiler, or one that fails: install without the kernel
                warnings.warn(f"ml.fastpath._tanh_mlp was not built ({type(error).__name__}: {error}); "
                              "CPU training will use the slower plain torch backward", stacklevel=1)

    return {
        "ext_modules": [CppExtension(
            "ml.fastpath._tanh_mlp", ["ml/fastpath/csrc/tanh_mlp.cpp"],
            # OpenMP for at::parallel_for; at run time it resolves to the libgomp torch has loaded.
            extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"], optional=True)],
        "cmdclass": {"build_ext": OptionalBuildExtension},
    }


setup(**kernel_build())
