"""Watchers for bench/watch.sh: opens N watchers on one node, each on its own key
(w/<i>), over STREAMS watch streams (environment; default N, one stream each; with
fewer, stream s carries watchers s, s + STREAMS, ..., as etcd multiplexes watches on a
gRPC stream), then probes: PUTs random watched keys at a steady rate while wrk loads the
cluster, and measures, for every probe, the time from its acknowledgement (the write is
committed and applied on the node that answered) to its arrival at its watcher. Prints
one JSON line: watchers, probes sent, delivered, p50/p99/max delay in ms.

Usage: watchers.py HOST PORT WATCHERS PROBE_SECONDS PROBES_PER_SECOND READY_FILE [load]
It writes READY_FILE once every stream is open, then waits for a line on stdin before
probing (the driver measures memory, starts the load, then says go). With `load`,
watcher i watches the prefix k<i as 4 digits> instead, which takes in ten of the
100,000 keys wrk's kv.lua writes (so every put of the load reaches one watcher), and
the probes write k<i>-probe; it also counts every event received.
"""
import asyncio, json, os, random, re, sys, time


def watched(i, load):
    return f"prefix=k{i:04d}" if load else f"key=w/{i}"


def stream_query(s, streams, watchers, load):
    return "&".join(watched(i, load) for i in range(s, watchers, streams))


def probe_key(i, load):
    return f"k{i:04d}-probe" if load else f"w/{i}"


async def open_watch(host, port, i, query, arrivals, opened, load, counts):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /v1/watch?{query}&progress_ms=600000 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise SystemExit(f"watch {i}: {status!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    opened.append(i)
    # The stream is read in blocks, not parsed chunk by chunk and line by line, so that
    # the client's CPU (on the same machine) takes as little from the cluster as it can:
    # events are counted by their type, and a probe found by its value. (Chunk framing
    # never looks like either.) The tail of each block is searched again with the next,
    # for a probe cut in two.
    tail = b""
    while True:
        block = await reader.read(1 << 16)
        if not block:
            return
        now = time.monotonic()
        counts[0] += block.count(b'"type":"put"')
        for token in PROBE.findall(tail + block):
            arrivals.setdefault(token.decode(), now)
        tail = block[-64:]


PROBE = re.compile(rb'"value":"(p[0-9]+)"')


async def probe(host, port, watchers, seconds, rate, acked, load):
    reader, writer = await asyncio.open_connection(host, port)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        started = time.monotonic()
        token = f"p{n}"
        body = token.encode()
        writer.write(f"PUT /v1/kv/{probe_key(random.randrange(watchers), load)} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        status = await reader.readline()
        length = 0
        while True:
            header = await reader.readline()
            if header in (b"\r\n", b""):
                break
            if header.lower().startswith(b"content-length:"):
                length = int(header.split(b":")[1])
        await reader.readexactly(length)
        if b" 200 " in status:
            acked[token] = time.monotonic()
        n += 1
        await asyncio.sleep(max(0.0, 1.0 / rate - (time.monotonic() - started)))


async def main():
    host, port, watchers, seconds, rate, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
    load = len(sys.argv) > 7 and sys.argv[7] == "load"
    arrivals, acked, opened, counts = {}, {}, [], [0]
    streams = min(int(os.environ.get("STREAMS") or watchers), watchers)
    tasks = []
    for s in range(streams):
        query = stream_query(s, streams, watchers, load)
        tasks.append(asyncio.create_task(open_watch(host, port, s, query, arrivals, opened, load, counts)))
        if s % 200 == 199:
            await asyncio.sleep(0.05)
    while len(opened) < streams:
        await asyncio.sleep(0.1)
    open(ready, "w").write("ready\n")
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu_before, wall_before = time.process_time(), time.monotonic()
    await probe(host, port, watchers, seconds, rate, acked, load)
    cpu_share = (time.process_time() - cpu_before) / (time.monotonic() - wall_before)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(t in arrivals for t in acked):
        await asyncio.sleep(0.05)
    # An event may reach its watcher before the PUT's answer reaches the prober (both
    # leave the node once the write is applied): counted as 0.
    delays = sorted(max(0.0, arrivals[t] - acked[t]) * 1000 for t in acked if t in arrivals)
    pick = lambda q: round(delays[min(len(delays) - 1, int(q * len(delays)))], 2) if delays else None
    print(json.dumps({"watchers": watchers, "streams": streams, "probes_acked": len(acked), "delivered": len(delays),
                      "delay_ms_p50": pick(0.5), "delay_ms_p99": pick(0.99),
                      "delay_ms_max": round(delays[-1], 2) if delays else None,
                      "events_received": counts[0],
                      "client_cpu_share": round(cpu_share, 3)}), flush=True)
    for t in tasks:
        t.cancel()


asyncio.run(main())
