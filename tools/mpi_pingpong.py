"""MPI point-to-point micro-benchmark for mpi4py (2 ranks).

Ping-pong with blocking uppercase Send/Recv on numpy buffers for several
message sizes, plus a non-blocking 1 MiB bidirectional exchange
(Isend/Irecv + Waitall).  Sizes are binary (KiB/MiB); bandwidth is in
GB/s = 1e9 bytes/s.

Timing: a warm-up, then the repetition count is grown until one timed run
lasts >= MIN_TIME seconds; that final run is reported.  Rank 0 decides and
broadcasts, so both ranks always run the same number of iterations.

Output: a human-readable table, then one line "JSON: {...}" for scripts.
"""
import json
import sys

import numpy as np
from mpi4py import MPI

MIN_TIME = 0.3
WARMUP = 20
SIZES = [("8 KiB", 8 * 1024), ("64 KiB", 64 * 1024),
         ("1 MiB", 1024 * 1024), ("16 MiB", 16 * 1024 * 1024)]
EXCHANGE_SIZE = 1024 * 1024

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
if comm.Get_size() != 2:
    if rank == 0:
        print("pingpong.py needs exactly 2 ranks", file=sys.stderr)
    comm.Abort(1)
peer = 1 - rank


def pingpong(buf, n):
    comm.Barrier()
    t0 = MPI.Wtime()
    if rank == 0:
        for _ in range(n):
            comm.Send(buf, dest=peer, tag=1)
            comm.Recv(buf, source=peer, tag=2)
    else:
        for _ in range(n):
            comm.Recv(buf, source=peer, tag=1)
            comm.Send(buf, dest=peer, tag=2)
    return MPI.Wtime() - t0


def exchange(sbuf, rbuf, n):
    comm.Barrier()
    t0 = MPI.Wtime()
    for _ in range(n):
        reqs = [comm.Irecv(rbuf, source=peer, tag=3),
                comm.Isend(sbuf, dest=peer, tag=3)]
        MPI.Request.Waitall(reqs)
    return MPI.Wtime() - t0


def timed(fn, *args):
    """Warm up, then grow n until one run takes >= MIN_TIME on rank 0."""
    fn(*args, WARMUP)
    n = 4
    while True:
        t = comm.bcast(fn(*args, n), root=0)
        if t >= MIN_TIME:
            return n, t
        n = max(2 * n, int(n * 1.2 * MIN_TIME / max(t, 1e-9)) + 1)


def check_data():
    """One round trip with a known pattern, to be sure the bytes arrive."""
    buf = np.arange(4096, dtype=np.int64) if rank == 0 else np.zeros(4096, np.int64)
    if rank == 0:
        comm.Send(buf, dest=1)
        back = np.empty_like(buf)
        comm.Recv(back, source=1)
        assert np.array_equal(back, buf * 2), "ping-pong data mismatch"
    else:
        comm.Recv(buf, source=0)
        comm.Send(buf * 2, dest=0)


check_data()
results = {"library": MPI.Get_library_version().replace("\x00", "").splitlines()[0].strip(),
           "mpi4py": __import__("mpi4py").__version__,
           "pingpong": [], "exchange": None}

for label, size in SIZES:
    buf = np.full(size, rank, dtype=np.uint8)
    n, t = timed(pingpong, buf)
    one_way = t / (2 * n)
    results["pingpong"].append({"size": label, "bytes": size, "iters": n,
                                "latency_us": one_way * 1e6,
                                "bandwidth_GBs": size / one_way / 1e9})

sbuf = np.full(EXCHANGE_SIZE, rank, dtype=np.uint8)
rbuf = np.empty(EXCHANGE_SIZE, dtype=np.uint8)
n, t = timed(exchange, sbuf, rbuf)
assert rbuf[0] == peer and rbuf[-1] == peer, "exchange data mismatch"
per = t / n
results["exchange"] = {"size": "1 MiB", "bytes": EXCHANGE_SIZE, "iters": n,
                       "time_us": per * 1e6,
                       "per_direction_GBs": EXCHANGE_SIZE / per / 1e9,
                       "aggregate_GBs": 2 * EXCHANGE_SIZE / per / 1e9}

if rank == 0:
    print(results["library"], "| mpi4py", results["mpi4py"])
    print(f"{'size':>8} {'iters':>8} {'latency_us':>12} {'GB/s':>8}")
    for r in results["pingpong"]:
        print(f"{r['size']:>8} {r['iters']:>8} {r['latency_us']:12.2f} "
              f"{r['bandwidth_GBs']:8.3f}")
    e = results["exchange"]
    print(f"exchange 1 MiB both ways (Isend/Irecv+Waitall): {e['time_us']:.1f} us, "
          f"{e['per_direction_GBs']:.3f} GB/s per direction, "
          f"{e['aggregate_GBs']:.3f} GB/s aggregate ({e['iters']} iters)")
    print("JSON:", json.dumps(results))
