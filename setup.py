"""Builds the CPU training kernel ``ml._tanh_mlp`` (metadata lives in pyproject.toml).

Without a working C++ compiler with OpenMP the build is skipped with a warning, and CPU
training takes the plain torch backward (see ``ml/dense.py``).
"""

import warnings

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


class OptionalBuildExtension(BuildExtension.with_options(use_ninja=False)):
    def run(self):
        try:
            super().run()
        except Exception as error:  # no compiler, or one that fails: install without the kernel
            warnings.warn(f"ml._tanh_mlp was not built ({type(error).__name__}: {error}); "
                          "CPU training will use the slower plain torch backward", stacklevel=1)


setup(
    ext_modules=[CppExtension(
        "ml._tanh_mlp", ["ml/csrc/tanh_mlp.cpp"],
        # OpenMP for at::parallel_for; at run time it resolves to the libgomp torch has loaded.
        extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"], optional=True)],
    cmdclass={"build_ext": OptionalBuildExtension},
)
