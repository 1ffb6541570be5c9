"""What memory handed back to the system costs this machine when it is needed again: the time per
page fault of refilling 1.8 GB of tensors (200 x 9 MiB, SmolLM2's hidden states at 8 x 512 tokens)
after ``malloc_trim`` returned them, in three conditions, each ``--repeats`` times:

* ``at once``: refilled right after the trim (the pages are the ones just freed);
* ``after a pause``: refilled ``--pause`` seconds later, the machine idle;
* ``beside a process``: refilled while another process holds ``--partner-gib`` GiB (as in
  ``vs_trainer_paired.py``, where the Trainer's process holds its memory while peftkit's steps).

Why: every way a CPU run lowers its peak (``--memory-budget``: freed blocks returned at once, heap
pages returned between transformer blocks) is paid for in these faults, and what one costs depends
on the machine. On a bare-metal Linux host a fault is about a microsecond; in a virtual machine whose
balloon reports free pages to its host (virtio-balloon free page reporting, as on the Firecracker
machines these benchmarks ran on), pages free for a while go back to the host, and the next fault on
them is the host's too: several times slower, and varying from one refill to the next.

    .venv/bin/python benchmarks/refault.py            # 3 repeats, 3 s pause, 8 GiB partner
    .venv/bin/python benchmarks/refault.py --repeats 5 --pause 10

Prints one line per refill and the median per condition; writes nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import platform
import resource
import statistics
import subprocess
import sys
import time

# the partner: holds GiB of touched memory until it is killed, saying when it has them
PARTNER = (
    "import sys, time, torch\n"
    "held = [torch.ones(2**28 // 4) for _ in range(int(sys.argv[1]) * 4)]\n"
    "print('holding', flush=True)\n"
    "time.sleep(3600)\n"
)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def refill(blocks: int = 200, floats: int = 9 * 2**20 // 4) -> tuple[float, int, list]:
    """Seconds and page faults to allocate and touch ``blocks`` tensors; the tensors."""
    import torch

    before, started = faults(), time.perf_counter()
    held = [torch.ones(floats) for _ in range(blocks)]
    return time.perf_counter() - started, faults() - before, held


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="refills per condition (default 3)")
    ap.add_argument("--pause", type=float, default=3.0, help="seconds idle before 'after a pause' (default 3)")
    ap.add_argument("--partner-gib", type=int, default=8, help="GiB the partner process holds (default 8)")
    args = ap.parse_args(argv)
    libc_name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if not libc_name or platform.libc_ver()[0] != "glibc":
        sys.exit("error: this measures glibc's malloc_trim on Linux; this machine has neither")
    trim = ctypes.CDLL(libc_name).malloc_trim
    import torch

    torch.set_num_threads(2)
    _, _, held = refill()  # the first touch of the process's memory is not a refill
    del held
    trim(0)
    per_fault: dict[str, list[float]] = {"at once": [], "after a pause": [], "beside a process": []}
    for i in range(args.repeats):
        for condition in per_fault:
            partner = None
            if condition == "after a pause":
                time.sleep(args.pause)
            elif condition == "beside a process":
                partner = subprocess.Popen(
                    [sys.executable, "-c", PARTNER, str(args.partner_gib)], stdout=subprocess.PIPE, text=True
                )
                assert partner.stdout is not None
                partner.stdout.readline()
            try:
                seconds, count, held = refill()
            finally:
                if partner is not None:
                    partner.kill()
                    partner.wait()
            micro = seconds / max(1, count) * 1e6
            per_fault[condition].append(micro)
            print(f"{i + 1}: {condition}: {seconds:.3f} s for {count:,} faults, {micro:.2f} us a fault", flush=True)
            del held
            trim(0)
    print("median us a fault: " + ", ".join(f"{c} {statistics.median(v):.2f}" for c, v in per_fault.items()))


if __name__ == "__main__":
    main()
