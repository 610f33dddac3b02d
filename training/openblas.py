"""Re-execute a training script with OpenBLAS first on LD_LIBRARY_PATH (train.py, eval.py).

Debian's torch links the reference BLAS (libblas.so.3 alternative), ~15x slower than OpenBLAS for the
DiT's matmuls. If /usr/lib/x86_64-linux-gnu/openblas-pthread exists (apt-get install libopenblas0-pthread)
the calling script restarts itself with it (no system change). Imports nothing heavy: call it before torch.
"""
import os
import sys

OPENBLAS = '/usr/lib/x86_64-linux-gnu/openblas-pthread'


def reexec_with_openblas():
    if os.path.isdir(OPENBLAS) and OPENBLAS not in os.environ.get('LD_LIBRARY_PATH', '').split(':'):
        env = dict(os.environ)
        env['LD_LIBRARY_PATH'] = OPENBLAS + (':' + env['LD_LIBRARY_PATH'] if env.get('LD_LIBRARY_PATH') else '')
        # torch's own threads (intra-op) do the parallel work; OpenBLAS stays single-threaded. Measured on
        # this 2-core machine, idle (DiT step, text_len 16): torch 2 + BLAS 1 0.52 s, torch 1 + BLAS 1 0.67 s,
        # torch 1 + BLAS 2 0.56 s, torch 2 + BLAS 2 1.05 s (the two thread pools fight over 2 cores).
        env.setdefault('OPENBLAS_NUM_THREADS', '1')
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
