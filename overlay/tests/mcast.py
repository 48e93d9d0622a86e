#!/usr/bin/env python3
"""UDP multicast for the overlay tests, as an application in a guest uses it.

recv GROUP PORT IFADDR SECONDS   joins GROUP on the interface holding IFADDR, prints
                                 "ready", then "received N" after SECONDS
send GROUP PORT IFADDR COUNT     COUNT datagrams, 10 ms apart, TTL 1
"""
import select, socket, sys, time

MARKER = b"hvx-mcast-stream "


def recv(group, port, ifaddr, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((group, int(port)))
    mreq = socket.inet_aton(group) + socket.inet_aton(ifaddr)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    print("ready", flush=True)
    seen = set()
    deadline = time.time() + float(seconds)
    while True:
        left = deadline - time.time()
        if left <= 0:
            break
        r, _, _ = select.select([s], [], [], left)
        if r:
            data = s.recv(2048)
            if data.startswith(MARKER):
                seen.add(data)
    print("received %d" % len(seen), flush=True)


def send(group, port, ifaddr, count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ifaddr))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    for i in range(int(count)):
        s.sendto(MARKER + str(i).encode(), (group, int(port)))
        time.sleep(0.01)


if __name__ == "__main__":
    {"recv": recv, "send": send}[sys.argv[1]](*sys.argv[2:])
