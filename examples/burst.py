"""Bursts of N concurrent Workload API connections, then all closed, to see whether the agent's
memory comes back (BENCHMARKS.md, "Memory after connection bursts").

Each round opens N gRPC channels (grpcio, one connection each), starts a FetchX509SVID stream on
every one, waits until all N have their first SVID, then closes them all; it prints the agent's
RSS at the peak and five seconds after. The agent must hold a lease for this process's uid.

usage: python burst.py SOCKET N ROUNDS AGENT_PID   (grpcio from tests/python/requirements.txt;
       raise the open-file limit first: ulimit -n 20000)
"""
import sys, threading, time, grpc
sock, n, rounds, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) // 1024
def one(barrier, errs, hold=None):
    ch = grpc.insecure_channel(f"unix:{sock}", options=[("grpc.use_local_subchannel_pool", 1)])
    call = ch.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID",
        request_serializer=lambda _: b"", response_deserializer=lambda b: b)
    try:
        barrier.wait()
        it = call(None, metadata=[("workload.spiffe.io", "true")], timeout=60)
        next(it)
        hold.wait()
        it.cancel()
    except Exception as e:
        errs.append(str(e)[:80])
    finally:
        ch.close()
print("start", rss(), "MiB", flush=True)
for r in range(rounds):
    errs = []
    barrier = threading.Barrier(n)
    hold = threading.Barrier(n + 1)
    ts = [threading.Thread(target=one, args=(barrier, errs, hold)) for _ in range(n)]
    for t in ts: t.start()
    try:
        hold.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    peak = rss(); fds = len(__import__("os").listdir(f"/proc/{pid}/fd"))
    for t in ts: t.join()
    time.sleep(5)
    print(f"round {r+1}: peak {peak} MiB with {fds} fds; after {rss()} MiB, errors {len(errs)} {errs[:1]}", flush=True)
