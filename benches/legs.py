#!/usr/bin/env python3
"""Where a proxied request's time goes, from packet captures (benches/profile.sh legs).

    legs.py PROXIED.pcap DIRECT.pcap PROXY_PORT UPSTREAM_PORT

PROXIED.pcap holds a run through the proxy (client <-> PROXY_PORT <-> UPSTREAM_PORT), and
DIRECT.pcap a run straight against UPSTREAM_PORT; every request carries a unique `after=`
query value (benches/wrk/unique.lua), which ties the proxy's upstream request to the client's.
HTTP/1.1 keep-alive answers in order, so an answer belongs to the last request on its
connection. Times are the kernel's capture timestamps on loopback.

Per proxied request it prints the distribution of:
  in-leg:   client request seen -> the proxy's request to upstream seen
  upstream: that request -> upstream's answer
  out-leg:  upstream's answer -> the proxy's answer to the client
and the whole server-side time next to the direct run's. It then groups upstream answers that
arrive less than 0.3 ms apart (a burst: their timers fired together) and shows the out-leg by
position in the burst, which separates a fixed per-hop cost from waiting behind the burst.
"""
import re
import statistics
import struct
import sys

AFTER = re.compile(rb"after=([^ &]+)")


LINK_HEADER = {0: 4, 1: 14, 12: 0, 101: 0, 113: 16, 276: 20}  # pcap link types tcpdump writes


def packets(path):
    """(time, source port, destination port, payload) of every IPv4 TCP segment with data,
    from a classic little-endian pcap file (what `tcpdump -w` writes here)."""
    with open(path, "rb") as f:
        header = f.read(24)
        if len(header) < 24:
            sys.exit("legs.py: %s is not a pcap file (empty: did tcpdump run?)" % path)
        magic = struct.unpack("<I", header[:4])[0]
        if magic not in (0xA1B2C3D4, 0xA1B23C4D):
            sys.exit("legs.py: %s: not a little-endian classic pcap file" % path)
        nano = magic == 0xA1B23C4D
        link = struct.unpack("<I", header[20:24])[0]
        if link not in LINK_HEADER:
            sys.exit("legs.py: %s: unsupported link type %d" % (path, link))
        while True:
            record = f.read(16)
            if len(record) < 16:
                return
            sec, frac, captured, _ = struct.unpack("<IIII", record)
            frame = f.read(captured)
            ip = frame[LINK_HEADER[link] :]
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
                continue  # not IPv4, or not TCP
            total = struct.unpack(">H", ip[2:4])[0]
            tcp = ip[(ip[0] & 15) * 4 : total]
            if len(tcp) < 20:
                continue
            sport, dport = struct.unpack(">HH", tcp[:4])
            payload = tcp[(tcp[12] >> 4) * 4 :]
            if payload:
                yield sec + frac / (1e9 if nano else 1e6), sport, dport, payload


def requests(path, front, upstream):
    """after-value -> {'in', 'fwd', 'back', 'out'} times (direct runs: 'in', 'out' only)."""
    seen, pending = {}, {}
    for t, sport, dport, payload in packets(path):
        if dport in (front, upstream) and payload.startswith(b"GET "):
            m = AFTER.search(payload)
            if not m:
                continue
            pending[(sport, dport)] = m.group(1)
            seen.setdefault(m.group(1), {})["in" if dport == front else "fwd"] = t
        elif sport in (front, upstream) and payload.startswith(b"HTTP/"):
            key = pending.pop((dport, sport), None)
            if key is not None:
                seen[key]["out" if sport == front else "back"] = t
    return seen


def summary(ms):
    ms = sorted(ms)
    n = len(ms)
    return "p10 %7.3f  p50 %7.3f  p90 %7.3f  p99 %7.3f  mean %7.3f ms" % (
        ms[n // 10], ms[n // 2], ms[n * 9 // 10], ms[n * 99 // 100], statistics.mean(ms))


def main():
    proxied_pcap, direct_pcap, proxy_port, upstream_port = sys.argv[1:5]
    proxy_port, upstream_port = int(proxy_port), int(upstream_port)
    proxied = [r for r in requests(proxied_pcap, proxy_port, upstream_port).values() if len(r) == 4]
    direct = [r for r in requests(direct_pcap, upstream_port, -1).values() if len(r) == 2]
    if not proxied or not direct:
        sys.exit("legs.py: no complete request in the captures")
    ms = lambda a, b, rs: [(r[b] - r[a]) * 1e3 for r in rs]
    print("requests: %d through the proxy, %d direct" % (len(proxied), len(direct)))
    print("  in-leg    " + summary(ms("in", "fwd", proxied)))
    print("  upstream  " + summary(ms("fwd", "back", proxied)))
    print("  out-leg   " + summary(ms("back", "out", proxied)))
    print("  proxied   " + summary(ms("in", "out", proxied)))
    print("  direct    " + summary(ms("in", "out", direct)))
    added = statistics.median(ms("in", "out", proxied)) - statistics.median(ms("in", "out", direct))
    print("  p50 added by the proxy: %+.3f ms" % added)

    # Bursts of upstream answers, in arrival order; each answer's position in its burst.
    order = sorted(range(len(proxied)), key=lambda i: proxied[i]["back"])
    bursts, position, previous = [], {}, None
    for i in order:
        t = proxied[i]["back"]
        if previous is None or t - previous >= 0.0003:
            bursts.append([])
        position[i] = len(bursts[-1])
        bursts[-1].append(i)
        previous = t
    sizes = [len(b) for b in bursts]
    print("upstream answers in bursts (< 0.3 ms apart): mean size %.1f, largest %d" % (statistics.mean(sizes), max(sizes)))
    by_position = {}
    for i, r in enumerate(proxied):
        by_position.setdefault(position[i], []).append((r["out"] - r["back"]) * 1e3)
    for i in sorted(by_position)[:8]:
        print("  out-leg of the answer at position %d: median %.3f ms (%d answers)" % (i, statistics.median(by_position[i]), len(by_position[i])))


if __name__ == "__main__":
    main()
