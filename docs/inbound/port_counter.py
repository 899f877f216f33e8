# Which source ports the kernel gives a client's connects and ztunnel's dials from that
# client's address to the same app, when the kernel picks the dial's port at connect as
# ztunnel let it until stop 32 (ARCHITECTURE.md, HBONE: "A dial and a client connection
# never take each other's tuple"). Two network namespaces joined by a veth: in "psc" the client
# connects to 10.77.0.1:9000; in "psa" a dial as ztunnel makes it (IP_TRANSPARENT, bound
# to the client's address with IP_BIND_ADDRESS_NO_PORT, non-blocking connect) to the
# same address. Prints the first ports of each and how many dial ports a client
# connection also had. Needs root; removes its namespaces.
#   sudo python3 docs/inbound/port_counter.py 300
import ctypes, os, socket, subprocess, sys

def sh(c):
    subprocess.run(c, shell=True, check=True)

libc = ctypes.CDLL(None, use_errno=True)

def enter(name):
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    assert libc.setns(fd, 0x40000000) == 0  # CLONE_NEWNET
    os.close(fd)

IP_TRANSPARENT, IP_BIND_ADDRESS_NO_PORT = 19, 24
sh("ip netns add psa; ip netns add psc; ip link add va netns psa type veth peer name vc netns psc")
try:
    sh("ip -n psa addr add 10.77.0.1/24 dev va; ip -n psa link set va up; ip -n psa link set lo up")
    sh("ip -n psc addr add 10.77.0.2/24 dev vc; ip -n psc link set vc up; ip -n psc link set lo up")
    enter("psa")
    listener = socket.socket()
    listener.bind(("10.77.0.1", 9000))
    listener.listen(4096)
    def dial():
        enter("psa")
        s = socket.socket()
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind(("10.77.0.2", 0))
        s.setblocking(False)
        try:
            s.connect(("10.77.0.1", 9000))
        except BlockingIOError:
            pass
        return s, s.getsockname()[1]
    def client():
        enter("psc")
        s = socket.socket()
        s.connect(("10.77.0.1", 9000))
        return s, s.getsockname()[1]
    held, seq = [], []
    for _ in range(int(sys.argv[1])):
        c, y = client(); held.append(c); seq.append(("client", y))
        d, x = dial(); held.append(d); seq.append(("dial", x))
    print(seq[:12])
    clients = {p for k, p in seq if k == "client"}
    dials = [p for k, p in seq if k == "dial"]
    print(f"dial ports a client connection also had: {sum(p in clients for p in dials)} of {len(dials)}")
finally:
    sh("ip netns del psa; ip netns del psc")
