""" Peak host-memory measurement (Linux) for CPU memory checks and benchmarks.

CPU tensors have no allocator statistics (unlike ``torch.cuda.max_memory_allocated``), so this measures the
process's resident-set high-water mark: ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS, the function
runs, and the growth of ``VmHWM`` is the peak extra memory it needed. Run it in a process started with
``MALLOC_MMAP_THRESHOLD_`` set (e.g. 131072): glibc then serves large blocks with mmap and returns them on free, so
the baseline is not inflated by freed-but-kept heap pages. Callers (tests, ``benchmarks/``) start a subprocess with
``MALLOC_ENV`` in its environment and call ``peak_rss_delta`` inside it.
"""
from typing import Callable

__all__ = ['peak_rss_delta', 'MALLOC_ENV']

MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': '131072', 'MALLOC_TRIM_THRESHOLD_': '131072'}


def _status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not found in /proc/self/status (peak_rss_delta needs Linux)')


def peak_rss_delta(fn: Callable[[], object]) -> int:
    """Bytes by which the resident-set peak grew while ``fn()`` ran (Linux only)."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    base = _status_kib('VmRSS')
    fn()
    return (_status_kib('VmHWM') - base) * 1024
