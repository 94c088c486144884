"""This process's memory figures, for summaries and benchmarks (no heavy imports: the stream reader
process uses them too)."""


def peak_rss():
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def status_bytes(key):
    """VmHWM (peak resident) or VmPeak (peak address space) of this process in bytes, from /proc/self/status;
    without /proc, the peak resident memory of getrusage for both.  VmHWM, unlike getrusage's ru_maxrss, is
    this process's own after execve (Linux carries ru_maxrss over from the process that started it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024
    except (OSError, StopIteration):
        return peak_rss()
