# Measures what SO_REUSEPORT does to the connections queued on a listener that closes
# (ARCHITECTURE.md, "Upgrade"). Runs in a network namespace of its own:
#   sudo unshare -n python3 docs/upgrade/reuseport.py 0   # net.ipv4.tcp_migrate_req=0 (default)
#   sudo unshare -n python3 docs/upgrade/reuseport.py 1   # Linux >= 5.14 migration on
import socket, subprocess, sys, time
migrate = sys.argv[1]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
open("/proc/sys/net/ipv4/tcp_migrate_req", "w").write(migrate)
def listener():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 15006)); s.listen(1024); return s
old, new = listener(), listener()
N = 400
clients = []
for i in range(N):
    c = socket.create_connection(("127.0.0.1", 15006)); clients.append(c)
time.sleep(0.2)
old.close()  # the old process stops accepting: its queue goes
new.setblocking(False)
accepted = 0
while True:
    try:
        conn, _ = new.accept(); conn.close(); accepted += 1
    except BlockingIOError:
        break
reset = 0
for c in clients:
    try:
        c.settimeout(1); c.send(b"x"); d = c.recv(1)
        if d == b"": pass
    except (ConnectionResetError, BrokenPipeError):
        reset += 1
    except socket.timeout:
        pass
print(f"tcp_migrate_req={migrate}: {N} connections queued across two SO_REUSEPORT listeners; old one closed: {accepted} taken by the new one, {reset} reset")
