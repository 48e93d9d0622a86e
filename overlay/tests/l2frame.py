#!/usr/bin/env python3
"""Raw Ethernet frames for the overlay tests (no scapy: plain AF_PACKET).

send IFACE DST_MAC ETHERTYPE MARKER [VLAN_ID]   one frame, payload = MARKER
recv IFACE MARKER SECONDS                       prints one line per frame carrying
                                                MARKER: "got dst=.. type=.. vlan=.."
arp IFACE SENDER_IP TARGET_IP MARKER             one broadcast ARP request (a
                                                gratuitous one when both IPs are
                                                equal), MARKER in the padding
flood IFACE DST_MAC ETHERTYPE MARKER COUNT       COUNT frames back to back (a storm)
tap TAP SRC_MAC DST_MAC MARKER_OUT MARKER_IN SECONDS
                                                be the guest behind an existing tap:
                                                write one frame when a line arrives on
                                                stdin, print frames carrying MARKER_IN
Received VLAN tags are reported whether they stay in the data or arrive in the
kernel's PACKET_AUXDATA (rx VLAN offload).
send with ETHERTYPE 0800 and HVX_IP=SRC,DST set sends a valid IPv4/UDP packet
carrying MARKER. send and arp use the interface's MAC as source unless HVX_SRC_MAC is set (spoofing
tests)."""
import os, socket, struct, sys, time

ETH_P_ALL = 0x0003
SOL_PACKET, PACKET_AUXDATA = 263, 8
TP_STATUS_VLAN_VALID = 1 << 4


def mac_bytes(s):
    return bytes(int(x, 16) for x in s.split(":"))


def send(iface, dst, ethertype, marker, vlan=None):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    src = source_mac(s)
    hdr = mac_bytes(dst) + src
    if vlan is not None:
        hdr += struct.pack("!HH", 0x8100, int(vlan))
    payload = marker.encode()
    if ethertype == "0800" and os.environ.get("HVX_IP"):
        payload = ipv4_udp(*os.environ["HVX_IP"].split(","), payload)
    frame = hdr + struct.pack("!H", int(ethertype, 16)) + payload
    frame += b"\0" * max(0, 60 - len(frame))
    s.send(frame)


def ipv4_udp(src, dst, payload):
    """A valid IPv4/UDP packet (to port 9, discard) carrying payload."""
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    total = sum(struct.unpack("!10H", hdr))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    hdr = hdr[:10] + struct.pack("!H", ~total & 0xFFFF) + hdr[12:]
    return hdr + udp


def flood(iface, dst, ethertype, marker, count):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    frame = mac_bytes(dst) + source_mac(s) + struct.pack("!H", int(ethertype, 16)) + marker.encode()
    frame += b"\0" * max(0, 60 - len(frame))
    start = time.time()
    for _ in range(int(count)):
        s.send(frame)
    print("sent %s in %.3f s" % (count, time.time() - start), flush=True)


def source_mac(sock):
    if os.environ.get("HVX_SRC_MAC"):
        return mac_bytes(os.environ["HVX_SRC_MAC"])
    return sock.getsockname()[4][:6]


def arp(iface, sender_ip, target_ip, marker):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    src = source_mac(s)
    ip = lambda a: socket.inet_aton(a)
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src + ip(sender_ip) + b"\0" * 6 + ip(target_ip)
    frame = b"\xff" * 6 + src + struct.pack("!H", 0x0806) + body + marker.encode()
    frame += b"\0" * max(0, 60 - len(frame))
    s.send(frame)


def recv(iface, marker, seconds):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    s.bind((iface, 0))
    print("ready", flush=True)
    # The window is `seconds` after the sender is done (stdin closed), not after
    # start: receivers started one after another on a loaded machine would otherwise
    # stop listening before the frame is sent. Frames queue in the bound socket
    # meanwhile, so none is missed however late this process runs.
    import select
    stdin_open = True
    deadline = None
    m = marker.encode()
    while True:
        if deadline is not None and deadline - time.time() <= 0:
            return
        wait = None if deadline is None else deadline - time.time()
        ready, _, _ = select.select([s] + ([sys.stdin] if stdin_open else []), [], [], wait)
        if sys.stdin in ready:
            if not sys.stdin.readline():
                stdin_open = False
                deadline = time.time() + float(seconds)
            continue
        if s not in ready:
            continue
        data, anc, _flags, addr = s.recvmsg(65535, socket.CMSG_SPACE(20))
        if addr[2] == socket.PACKET_OUTGOING or m not in data:
            continue
        vlan = None
        etype = struct.unpack("!H", data[12:14])[0]
        if etype == 0x8100:
            vlan = struct.unpack("!H", data[14:16])[0] & 0xFFF
            etype = struct.unpack("!H", data[16:18])[0]
        for level, typ, cdata in anc:
            if level == SOL_PACKET and typ == PACKET_AUXDATA and len(cdata) >= 20:
                status, _l, _s, _mac, _net, tci, _tpid = struct.unpack("IIIHHHH", cdata[:20])
                if status & TP_STATUS_VLAN_VALID:
                    vlan = tci & 0xFFF
        dst = ":".join("%02x" % b for b in data[:6])
        print("got dst=%s type=%04x vlan=%s" % (dst, etype, vlan), flush=True)


def tap(name, src, dst, marker_out, marker_in, seconds):
    import fcntl, os, select
    TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    print("ready", flush=True)
    sys.stdin.readline()
    frame = mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", 0x88B5) + marker_out.encode()
    os.write(fd, frame + b"\0" * max(0, 60 - len(frame)))
    deadline = time.time() + float(seconds)
    m = marker_in.encode()
    while True:
        left = deadline - time.time()
        if left <= 0:
            return
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            return
        data = os.read(fd, 65535)
        if m in data:
            print("got dst=%s" % ":".join("%02x" % b for b in data[:6]), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(*sys.argv[2:])
    elif sys.argv[1] == "arp":
        arp(*sys.argv[2:])
    elif sys.argv[1] == "flood":
        flood(*sys.argv[2:])
    elif sys.argv[1] == "tap":
        tap(*sys.argv[2:])
    else:
        recv(*sys.argv[2:])
