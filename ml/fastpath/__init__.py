"""The CPU fast path of the policy's MLP: an optional backend the readable torch path does not need.

``ml.agent.policy`` runs its MLP as plain torch layers, and takes this path
instead when ``applies`` says so (float32 on the CPU, oneDNN available, not
exporting or tracing). ``tanh_mlp`` then runs the layers through oneDNN with
the tanh fused, and its backward through the compiled kernel
``ml.fastpath._tanh_mlp`` when ``make venv`` built it (``csrc/tanh_mlp.cpp``),
else layer by layer. ``keep_freed_memory`` tunes glibc's allocator for
training's repeated large allocations.
"""

from ml.fastpath.allocator import keep_freed_memory
from ml.fastpath.dense import kernel_built, tanh_mlp, uses_onednn as applies

__all__ = ["applies", "kernel_built", "keep_freed_memory", "tanh_mlp"]
