"""Run a command and report its own peak RSS: ``python -m bench.rss OUT.json -- CMD ...``.

Linux keeps a process's RSS high-water mark across ``exec``, and a child forked (or
vforked) from a large parent starts with the parent's mark: measured from the benchmark
process, ``ru_maxrss`` of a child would report the benchmark's own size. This small
launcher forks the command itself, so ``wait4`` gives the command's own peak. The command's
stdout/stderr pass through; the measurement goes to OUT.json.
"""

import json
import os
import subprocess
import sys
import time


def main() -> int:
    out, sep, *cmd = sys.argv[1:]
    assert sep == "--" and cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with open(out, "w") as f:
        json.dump(
            {
                "returncode": code,
                "maxrss_kb": usage.ru_maxrss,
                "wall_s": time.perf_counter() - t0,
                "user_s": usage.ru_utime,
                "sys_s": usage.ru_stime,
            },
            f,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
